//! Group commit of sealed batches into the store.
//!
//! # When the store fails
//!
//! A commit that fails (disk full, EFBIG, EIO, a closed store) raises the `store` fault
//! (`/health` is `degraded: store: …`), counts `store_errors` and is retried with capped
//! exponential backoff ([`RETRY`]). Meanwhile the committer keeps taking sealed batches, so
//! the batcher and the sources run on; it holds them in memory up to [`PENDING_LIMIT`]
//! batches and [`PENDING_MAX_BYTES`] bytes. Beyond either bound it drops the oldest
//! `readings` batch, then the oldest `alarms`, then the oldest `audit` (alarms and audit are
//! kept longest), counting each in `batches_lost`. From the [`REOPEN_AFTER`]-th failure in a
//! row on, every retry first reopens the store in place ([`Outbox::reopen`]): sled keeps a
//! failed write as a global error even after space returns. The first commit that succeeds
//! clears the fault.
//!
//! A batch the store refuses for good (larger than the quota, sequence exhausted) is dropped,
//! counted in `batches_lost` and raises the fault until a later commit succeeds without one.
//! At shutdown (input closed) the committer retries [`SHUTDOWN_RETRIES`] more times, then
//! gives up and counts what it still held in `batches_lost`; a gateway whose `batches_lost` is
//! not zero does not stop clean.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::backoff::{Backoff, BackoffPolicy};
use crate::reading::Stream;
use crate::seal::SealedBatch;
use crate::store::{CommitOutcome, Outbox, Staged, StoreError, StoredBatch};
use crate::telemetry::Metrics;

/// Highest committed sequence number per stream, indexed by `Stream::code`.
pub(crate) type CommittedMarks = [u64; Stream::COUNT];

/// Most batches held in memory while the store refuses writes (disk full, I/O error).
/// Beyond it the oldest is dropped and counted: the gateway degrades, it does not die.
pub(crate) const PENDING_LIMIT: usize = 256;
/// Most envelope bytes held in memory while the store refuses writes.
pub(crate) const PENDING_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Most batches appended before one flush.
const GROUP_MAX: usize = 64;
/// Delays between commit attempts while the store fails.
pub(crate) const RETRY: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(5),
};
/// From this many failed commits in a row on, each retry reopens the store first.
pub(crate) const REOPEN_AFTER: u32 = 2;
/// Attempts after the input closed (shutdown) before what is held is given up.
const SHUTDOWN_RETRIES: u32 = 3;
/// The longest wait between those attempts.
const SHUTDOWN_RETRY_DELAY: Duration = Duration::from_millis(500);
/// The fault key the committer raises while the store fails.
pub(crate) const STORE_FAULT: &str = "store";

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
    pending_bytes: usize,
    /// True once the sealed channel closed (shutdown).
    closed: bool,
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
            pending_bytes: 0,
            closed: false,
        }
    }

    /// Runs until the sealed channel closes and everything received is committed (or
    /// the store keeps failing past the last retries; see the module docs).
    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(RETRY);
        let mut retries_after_close = 0;
        loop {
            if self.pending.is_empty() {
                if self.closed {
                    break;
                }
                match self.sealed_rx.recv().await {
                    Some(b) => self.push(b),
                    None => break,
                }
            }
            self.take_ready();
            if backoff.failures() >= REOPEN_AFTER {
                match self.outbox.reopen().await {
                    Ok(()) => self.metrics.store_reopens.inc(),
                    Err(e) => warn!(error = %e, "store reopen failed; retrying later"),
                }
            }
            match self.commit_pending().await {
                Ok(()) => {
                    if backoff.failures() > 0 {
                        warn!(
                            failures = backoff.failures(),
                            "store commits again; fault cleared"
                        );
                    }
                    backoff.reset();
                }
                Err(e) => {
                    self.metrics.store_errors.inc();
                    self.metrics
                        .raise_fault(STORE_FAULT, format!("store: commits failing ({e})"));
                    error!(
                        error = %e,
                        disk_full = e.is_disk_full(),
                        pending = self.pending.len(),
                        failures = backoff.failures() + 1,
                        "store commit failed; holding batches and retrying"
                    );
                    if self.closed {
                        retries_after_close += 1;
                        if retries_after_close > SHUTDOWN_RETRIES {
                            let lost = self.pending.len() as u64;
                            self.metrics.batches_lost.add(lost);
                            error!(lost, "giving up on uncommitted batches at shutdown");
                            return;
                        }
                    }
                    let delay = backoff.next_delay();
                    // Shutting down: a few quick tries within the grace period, not long waits.
                    let delay = if self.closed {
                        delay.min(SHUTDOWN_RETRY_DELAY)
                    } else {
                        delay
                    };
                    self.wait_taking_batches(delay).await;
                }
            }
        }
    }

    /// Moves batches that are already waiting into `pending` (up to a group).
    fn take_ready(&mut self) {
        while !self.closed && self.pending.len() < GROUP_MAX {
            match self.sealed_rx.try_recv() {
                Ok(b) => self.push(b),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.closed = true,
            }
        }
    }

    /// Sleeps `delay` while still taking sealed batches, so the batcher never waits on a
    /// failing store (the pending bounds apply instead).
    async fn wait_taking_batches(&mut self, delay: Duration) {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return,
                b = self.sealed_rx.recv(), if !self.closed => match b {
                    Some(b) => self.push(b),
                    None => self.closed = true,
                },
            }
        }
    }

    fn push(&mut self, batch: SealedBatch) {
        if batch.is_checkpoint_only() {
            // A newer lone checkpoint supersedes an older one still held.
            self.pending.retain(|b| !b.is_checkpoint_only());
        }
        self.pending_bytes += batch.bytes.len() + batch.checkpoint.as_ref().map_or(0, Vec::len);
        self.pending.push_back(batch);
        while self.pending.len() > PENDING_LIMIT
            || (self.pending_bytes > PENDING_MAX_BYTES && self.pending.len() > 1)
        {
            // The oldest purpose-flow batch first; alarms and audit are kept longest; a lone
            // checkpoint is never dropped (it is superseded).
            let real = |b: &SealedBatch| !b.is_checkpoint_only();
            let idx = self
                .pending
                .iter()
                .position(|b| real(b) && !b.stream.is_priority())
                .or_else(|| {
                    [Stream::Alarms, Stream::Audit]
                        .into_iter()
                        .find_map(|s| self.pending.iter().position(|b| real(b) && b.stream == s))
                });
            let Some(lost) = idx.and_then(|i| self.pending.remove(i)) else {
                break;
            };
            self.pending_bytes -= lost.bytes.len() + lost.checkpoint.as_ref().map_or(0, Vec::len);
            self.metrics.batches_lost.inc();
            warn!(stream = %lost.stream, seq = lost.seq, "store unavailable; held batch dropped");
        }
    }

    /// Appends every pending batch and flushes once, on a blocking thread.
    async fn commit_pending(&mut self) -> Result<(), StoreError> {
        let mut marks = *self.committed_tx.borrow();
        let mut batches = 0;
        let staged: Vec<Staged> = self
            .pending
            .iter()
            .map(|b| {
                if b.is_checkpoint_only() {
                    return Staged::Checkpoint(b.checkpoint.clone().unwrap_or_default());
                }
                batches += 1;
                let m = &mut marks[b.stream.index()];
                *m = (*m).max(b.seq);
                let stored = StoredBatch {
                    stream: b.stream,
                    seq: b.seq,
                    bytes: b.bytes.clone(),
                };
                Staged::Batch(stored, b.checkpoint.clone())
            })
            .collect();
        let n = staged.len();
        let CommitOutcome { evicted, refused } = self.outbox.commit(staged).await?;
        self.pending.drain(..n);
        self.pending_bytes = self
            .pending
            .iter()
            .map(|b| b.bytes.len() + b.checkpoint.as_ref().map_or(0, Vec::len))
            .sum();
        self.metrics
            .batches_committed
            .add((batches - refused.len()) as u64);
        let evicted = evicted.len() as u64;
        if evicted > 0 {
            self.metrics.batches_evicted.add(evicted);
            warn!(evicted, "store quota reached; oldest batches evicted");
        }
        if let Some((_, _, why)) = refused.first() {
            self.metrics.batches_lost.add(refused.len() as u64);
            for (stream, seq, why) in &refused {
                error!(%stream, seq, reason = %why, "store refused a batch; it is lost");
            }
            self.metrics
                .raise_fault(STORE_FAULT, format!("store: batches refused ({why})"));
        } else {
            self.metrics.clear_fault(STORE_FAULT);
        }
        self.committed_tx.send_replace(marks);
        if self.closed && self.pending.is_empty() {
            info!("committer drained");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;
    use crate::store::{AppendOutcome, MemStore, Store, StoreStats};

    /// A store whose writes fail with ENOSPC while `full` is set, like a disk that filled; it
    /// counts reopens.
    #[derive(Debug, Default)]
    struct FullDisk {
        inner: MemStore,
        full: AtomicBool,
        reopens: AtomicU32,
    }

    impl FullDisk {
        fn check(&self) -> Result<(), StoreError> {
            if self.full.load(Ordering::SeqCst) {
                return Err(StoreError::Sled(sled::Error::Io(
                    std::io::Error::from_raw_os_error(28),
                )));
            }
            Ok(())
        }
    }

    impl Store for FullDisk {
        fn append(&self, s: Stream, seq: u64, b: &[u8]) -> Result<AppendOutcome, StoreError> {
            self.check()?;
            self.inner.append(s, seq, b)
        }
        fn append_checkpointed(
            &self,
            s: Stream,
            seq: u64,
            b: &[u8],
            c: &[u8],
        ) -> Result<AppendOutcome, StoreError> {
            self.check()?;
            self.inner.append_checkpointed(s, seq, b, c)
        }
        fn put_checkpoint(&self, c: &[u8]) -> Result<(), StoreError> {
            self.check()?;
            self.inner.put_checkpoint(c)
        }
        fn checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.checkpoint()
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.check()?;
            self.inner.flush()
        }
        fn peek(&self, s: Stream, from: u64, max: usize) -> Result<Vec<StoredBatch>, StoreError> {
            self.inner.peek(s, from, max)
        }
        fn ack(&self, s: Stream, seq: u64) -> Result<bool, StoreError> {
            self.inner.ack(s, seq)
        }
        fn purge(&self, s: Stream) -> Result<crate::store::Purged, StoreError> {
            self.check()?;
            self.inner.purge(s)
        }
        fn next_seq(&self, s: Stream) -> u64 {
            self.inner.next_seq(s)
        }
        fn stats(&self) -> StoreStats {
            self.inner.stats()
        }
        fn incarnation(&self) -> u64 {
            self.inner.incarnation()
        }
        fn reopen(&self) -> Result<(), StoreError> {
            self.reopens.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn sealed(stream: Stream, seq: u64, len: usize) -> SealedBatch {
        SealedBatch {
            stream,
            seq,
            bytes: vec![seq as u8; len],
            checkpoint: None,
        }
    }

    struct Rig {
        sealed_tx: mpsc::Sender<SealedBatch>,
        marks_rx: watch::Receiver<CommittedMarks>,
        metrics: Arc<Metrics>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(store: Arc<dyn Store>) -> Rig {
        let (sealed_tx, sealed_rx) = mpsc::channel(8);
        let (committed_tx, marks_rx) = watch::channel([0; Stream::COUNT]);
        let metrics = Arc::new(Metrics::default());
        let committer =
            Committer::new(sealed_rx, Outbox::new(store), metrics.clone(), committed_tx);
        Rig {
            sealed_tx,
            marks_rx,
            metrics,
            task: tokio::spawn(committer.run()),
        }
    }

    /// Lets paused time run until `cond` holds (bounded).
    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }

    /// issue 9 item 2: a full disk degrades health and holds batches within a bound, dropping
    /// readings before alarms and audit; when space returns the store is reopened, what is
    /// held is committed and the fault clears.
    #[tokio::test(start_paused = true)]
    async fn a_full_disk_degrades_holds_within_the_bound_and_recovers_by_itself() {
        let store = Arc::new(FullDisk::default());
        store.full.store(true, Ordering::SeqCst);
        let rig = start(store.clone());
        rig.sealed_tx
            .send(sealed(Stream::Alarms, 1, 10))
            .await
            .unwrap();
        rig.sealed_tx
            .send(sealed(Stream::Audit, 1, 10))
            .await
            .unwrap();
        until(|| rig.metrics.store_errors.get() >= 1).await;
        let faults = rig.metrics.faults();
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert!(
            faults[0].starts_with("store: commits failing"),
            "{faults:?}"
        );
        assert!(faults[0].contains("No space left"), "{faults:?}");

        // The committer keeps taking batches while it waits: the batcher never blocks.
        let readings = PENDING_LIMIT as u64 + 10;
        for seq in 1..=readings {
            rig.sealed_tx
                .send(sealed(Stream::Readings, seq, 10))
                .await
                .unwrap();
        }
        until(|| rig.metrics.batches_lost.get() == 12).await;
        until(|| store.reopens.load(Ordering::SeqCst) >= 1).await;
        assert_eq!(
            *rig.marks_rx.borrow(),
            [0; Stream::COUNT],
            "nothing committed yet"
        );
        assert_eq!(rig.metrics.batches_committed.get(), 0);

        store.full.store(false, Ordering::SeqCst);
        until(|| rig.metrics.batches_committed.get() == PENDING_LIMIT as u64).await;
        assert!(rig.metrics.faults().is_empty(), "fault cleared");
        assert_eq!(rig.marks_rx.borrow()[..3], [readings, 1, 1]);
        // The oldest readings were dropped; alarms and audit were kept.
        let kept = store.peek(Stream::Readings, 0, usize::MAX).unwrap();
        assert_eq!(kept.first().map(|b| b.seq), Some(13));
        assert_eq!(kept.len() as u64, readings - 12);
        assert_eq!(store.stats().get(Stream::Alarms).batches, 1);
        assert_eq!(store.stats().get(Stream::Audit).batches, 1);

        drop(rig.sealed_tx);
        rig.task.await.unwrap();
        assert_eq!(rig.metrics.batches_lost.get(), 12);
    }

    /// issue 9 items 2 and 6: a store that keeps failing at shutdown loses what is held, and
    /// says so in `batches_lost` (so the gateway does not stop clean).
    #[tokio::test(start_paused = true)]
    async fn what_is_still_held_when_shutdown_gives_up_is_counted_lost() {
        let store = Arc::new(FullDisk::default());
        store.full.store(true, Ordering::SeqCst);
        let rig = start(store.clone());
        for seq in 1..=4 {
            rig.sealed_tx
                .send(sealed(Stream::Readings, seq, 10))
                .await
                .unwrap();
        }
        drop(rig.sealed_tx);
        rig.task.await.unwrap();
        assert_eq!(rig.metrics.batches_lost.get(), 4);
        assert_eq!(rig.metrics.batches_committed.get(), 0);
        assert!(!rig.metrics.faults().is_empty());
    }

    /// issue 9 item 6: a batch larger than the quota is refused, counted lost and raises the
    /// store fault; it does not wedge the batches behind it.
    #[tokio::test(start_paused = true)]
    async fn a_batch_the_quota_can_never_hold_is_lost_loudly_and_does_not_wedge_the_rest() {
        let store = Arc::new(MemStore::new(100));
        let rig = start(store.clone());
        rig.sealed_tx
            .send(sealed(Stream::Readings, 1, 101))
            .await
            .unwrap();
        until(|| rig.metrics.batches_lost.get() == 1).await;
        let faults = rig.metrics.faults();
        assert!(
            faults.len() == 1 && faults[0].contains("larger than the store quota"),
            "{faults:?}"
        );
        rig.sealed_tx
            .send(sealed(Stream::Readings, 2, 50))
            .await
            .unwrap();
        until(|| rig.metrics.batches_committed.get() == 1).await;
        assert!(rig.metrics.faults().is_empty());
        assert_eq!(store.stats().get(Stream::Readings).batches, 1);
        drop(rig.sealed_tx);
        rig.task.await.unwrap();
    }
}

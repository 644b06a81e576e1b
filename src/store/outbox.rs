//! [`Outbox`]: the handle async code holds on the store.
//!
//! Every [`Store`] call blocks (sled I/O; `flush` can take hundreds of milliseconds; `append`
//! holds the ledger lock across eviction scans). The outbox makes each call on a blocking
//! thread (`tokio::task::spawn_blocking`), so async tasks get only `async fn`s and never the
//! sync store: the committer, the forwarder, the status endpoint and the uplink's last-chance
//! wait all hold an `Outbox` (or its stats receiver), not an `Arc<dyn Store>`.
//!
//! # Stats without the writer's lock
//!
//! After every call that can change the counters (append, group commit, ack, flush), still on
//! the blocking thread, the outbox reads [`Store::stats`] and publishes the snapshot through a
//! `tokio::sync::watch`. Readers ([`Outbox::stats`], [`Outbox::stats_rx`]) only borrow the
//! last snapshot: they never wait for an append that holds the ledger lock, and a waiter
//! (`changed()`) wakes on the next change instead of polling. Publishing is serialised by its
//! own lock and each publisher reads the counters after taking it, so a slow publisher never
//! replaces a newer snapshot with an older one: the last publish always follows the last
//! change.
//!
//! # How it fails
//!
//! Store errors are returned as they are. A blocking task that panicked or was cancelled (the
//! runtime shutting down) becomes [`StoreError::Task`]; the committer retries it like a disk
//! error.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::reading::Stream;

#[cfg(test)]
use super::AppendOutcome;
use super::{Store, StoreError, StoreStats, StoredBatch};

/// One item of a group commit, in pipeline order.
#[derive(Debug, Clone)]
pub(crate) enum Staged {
    /// A sealed batch, with the pipeline checkpoint that goes with it, if any.
    Batch(StoredBatch, Option<Vec<u8>>),
    /// A checkpoint on its own (written in order after the batches before it).
    Checkpoint(Vec<u8>),
}

impl From<StoredBatch> for Staged {
    fn from(b: StoredBatch) -> Staged {
        Staged::Batch(b, None)
    }
}

/// A cheap-to-clone async handle on a [`Store`]. See the module docs.
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    stats_tx: watch::Sender<StoreStats>,
    /// Serialises read-then-publish of the stats (see the module docs).
    publish: Mutex<()>,
    /// `Store::next_seq` per stream (by code) when the handle was made.
    next_seq_at_open: [u64; Stream::COUNT],
    /// `Store::incarnation`, read once (it never changes).
    incarnation: u64,
    /// `Store::recovery`, read once.
    recovery: Option<super::Recovery>,
    /// `Store::checkpoint`, read once, for the pipeline to resume from.
    checkpoint_at_open: Option<Vec<u8>>,
}

impl Inner {
    /// Publishes the store's counters as they are now. Runs on a blocking thread: it may wait
    /// for the ledger lock.
    fn publish(&self) {
        let _guard = self.publish.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.store.stats();
        self.stats_tx.send_if_modified(|published| {
            let changed = *published != now;
            if changed {
                *published = now;
            }
            changed
        });
    }
}

/// What a group commit ([`Outbox::commit`]) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CommitOutcome {
    /// Batches dropped by the quota to make room, oldest first: (stream, seq, bytes).
    pub evicted: Vec<(Stream, u64, u64)>,
    /// Batches the store refused for good ([`StoreError::TooLarge`],
    /// [`StoreError::SeqExhausted`]): (stream, seq, why). They are not stored; retrying
    /// cannot help.
    pub refused: Vec<(Stream, u64, String)>,
}

impl Outbox {
    /// Wraps `store`. Reads its counters and sequence numbers once, here, on the calling
    /// thread (an uncontended lock), and its last checkpoint (one small read): make the
    /// handle before writers start, off the async workers.
    pub(crate) fn new(store: Arc<dyn Store>) -> Outbox {
        let next_seq_at_open = Stream::ALL.map(|s| store.next_seq(s));
        let incarnation = store.incarnation();
        let recovery = store.recovery();
        let checkpoint_at_open = store.checkpoint().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the store's checkpoint cannot be read; windows start fresh");
            None
        });
        let (stats_tx, _) = watch::channel(store.stats());
        Outbox {
            inner: Arc::new(Inner {
                store,
                stats_tx,
                publish: Mutex::new(()),
                next_seq_at_open,
                incarnation,
                recovery,
                checkpoint_at_open,
            }),
        }
    }

    /// The checkpoint the store held when this handle was made.
    pub(crate) fn checkpoint_at_open(&self) -> Option<&[u8]> {
        self.inner.checkpoint_at_open.as_deref()
    }

    /// Runs `f` on the store on a blocking thread, then publishes the stats if `publish`.
    async fn call<T, F>(&self, publish: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let result = f(inner.store.as_ref());
            if publish {
                inner.publish();
            }
            result
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// [`Store::purge`], off the async workers; the stats are published after it.
    pub(crate) async fn purge(&self, stream: Stream) -> Result<super::Purged, StoreError> {
        self.call(true, move |s| s.purge(stream)).await
    }

    /// [`Store::append`], off the async workers.
    #[cfg(test)]
    pub(crate) async fn append(
        &self,
        stream: Stream,
        seq: u64,
        bytes: Vec<u8>,
    ) -> Result<AppendOutcome, StoreError> {
        self.call(true, move |s| s.append(stream, seq, &bytes))
            .await
    }

    /// Group commit: appends every batch (with its checkpoint, atomically) and writes every
    /// lone checkpoint in order, then flushes once. A batch the store
    /// refuses with [`StoreError::SeqRegression`] was stored by an earlier attempt whose flush
    /// failed, and is skipped. A batch refused for good (too large for the quota, sequence
    /// exhausted) is reported in [`CommitOutcome::refused`] and the group goes on. Any other
    /// error stops the group; batches appended before it stay staged (a retry skips them as
    /// above) and nothing is committed.
    pub(crate) async fn commit(&self, staged: Vec<Staged>) -> Result<CommitOutcome, StoreError> {
        self.call(true, move |s| {
            let mut out = CommitOutcome::default();
            for item in &staged {
                let (b, checkpoint) = match item {
                    Staged::Batch(b, checkpoint) => (b, checkpoint.as_deref()),
                    Staged::Checkpoint(c) => {
                        s.put_checkpoint(c)?;
                        continue;
                    }
                };
                let appended = match checkpoint {
                    Some(c) => s.append_checkpointed(b.stream, b.seq, &b.bytes, c),
                    None => s.append(b.stream, b.seq, &b.bytes),
                };
                match appended {
                    Ok(outcome) => out.evicted.extend(outcome.evicted),
                    Err(StoreError::SeqRegression { .. }) => {}
                    Err(e @ (StoreError::TooLarge { .. } | StoreError::SeqExhausted { .. })) => {
                        out.refused.push((b.stream, b.seq, e.to_string()));
                    }
                    Err(e) => return Err(e),
                }
            }
            s.flush()?;
            Ok(out)
        })
        .await
    }

    /// [`Store::reopen`], off the async workers: after a write failed, so an engine that
    /// keeps its error (sled after ENOSPC) works again once the cause is gone.
    pub(crate) async fn reopen(&self) -> Result<(), StoreError> {
        self.call(true, |s| s.reopen()).await
    }

    /// [`Store::peek`], off the async workers.
    pub(crate) async fn peek(
        &self,
        stream: Stream,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        self.call(false, move |s| s.peek(stream, from_seq, max))
            .await
    }

    /// [`Store::ack`], off the async workers.
    pub(crate) async fn ack(&self, stream: Stream, seq: u64) -> Result<bool, StoreError> {
        self.call(true, move |s| s.ack(stream, seq)).await
    }

    /// [`Store::next_seq`] as it was when the handle was made: where the batcher continues
    /// and the committed marks start.
    pub(crate) fn next_seq_at_open(&self, stream: Stream) -> u64 {
        self.inner.next_seq_at_open[stream.index()]
    }

    /// The store's incarnation id ([`Store::incarnation`]). Never waits for the store.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// The damaged store this one replaced at open, if it did ([`Store::recovery`]).
    pub(crate) fn recovery(&self) -> Option<&super::Recovery> {
        self.inner.recovery.as_ref()
    }

    /// The last published counters. Never waits for the store.
    pub(crate) fn stats(&self) -> StoreStats {
        self.inner.stats_tx.borrow().clone()
    }

    /// A receiver of the published counters, to read them or wait for a change.
    pub(crate) fn stats_rx(&self) -> watch::Receiver<StoreStats> {
        self.inner.stats_tx.subscribe()
    }
}

impl From<Arc<dyn Store>> for Outbox {
    fn from(store: Arc<dyn Store>) -> Outbox {
        Outbox::new(store)
    }
}

impl<S: Store> From<Arc<S>> for Outbox {
    fn from(store: Arc<S>) -> Outbox {
        Outbox::new(store)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    use super::super::MemStore;
    use super::*;

    /// A store whose `append` holds its lock until the test lets go, like `SledStore`'s
    /// ledger lock across an eviction scan; `stats` takes the same lock.
    #[derive(Debug)]
    struct StuckStore {
        inner: MemStore,
        lock: Mutex<()>,
        entered_tx: Mutex<std_mpsc::Sender<()>>,
        release_rx: Mutex<std_mpsc::Receiver<()>>,
    }

    impl Store for StuckStore {
        fn append(
            &self,
            stream: Stream,
            seq: u64,
            bytes: &[u8],
        ) -> Result<AppendOutcome, StoreError> {
            let _held = self.lock.lock().unwrap();
            self.entered_tx.lock().unwrap().send(()).unwrap();
            self.release_rx.lock().unwrap().recv().unwrap();
            self.inner.append(stream, seq, bytes)
        }
        fn append_checkpointed(
            &self,
            s: Stream,
            seq: u64,
            b: &[u8],
            c: &[u8],
        ) -> Result<AppendOutcome, StoreError> {
            self.inner.append_checkpointed(s, seq, b, c)
        }
        fn put_checkpoint(&self, c: &[u8]) -> Result<(), StoreError> {
            self.inner.put_checkpoint(c)
        }
        fn checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.checkpoint()
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
        fn peek(&self, s: Stream, from: u64, max: usize) -> Result<Vec<StoredBatch>, StoreError> {
            self.inner.peek(s, from, max)
        }
        fn ack(&self, stream: Stream, seq: u64) -> Result<bool, StoreError> {
            self.inner.ack(stream, seq)
        }
        fn purge(&self, stream: Stream) -> Result<crate::store::Purged, StoreError> {
            self.inner.purge(stream)
        }
        fn next_seq(&self, stream: Stream) -> u64 {
            self.inner.next_seq(stream)
        }
        fn stats(&self) -> StoreStats {
            let _held = self.lock.lock().unwrap();
            self.inner.stats()
        }
        fn incarnation(&self) -> u64 {
            self.inner.incarnation()
        }
    }

    #[tokio::test]
    async fn stats_answer_while_an_append_holds_the_store_lock() {
        let (entered_tx, entered_rx) = std_mpsc::channel();
        let (release_tx, release_rx) = std_mpsc::channel();
        let outbox = Outbox::new(Arc::new(StuckStore {
            inner: MemStore::new(1000),
            lock: Mutex::new(()),
            entered_tx: Mutex::new(entered_tx),
            release_rx: Mutex::new(release_rx),
        }));
        let mut stats_rx = outbox.stats_rx();
        let writer = outbox.clone();
        let append = tokio::spawn(async move {
            writer
                .append(Stream::Readings, 1, vec![0; 10])
                .await
                .unwrap()
        });
        tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
            .await
            .unwrap();

        // The append holds the lock: the snapshot still answers (read on another thread, so
        // a reader that waited for the lock fails the test instead of hanging it).
        let reader = outbox.clone();
        let read = tokio::task::spawn_blocking(move || reader.stats());
        let stats = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("stats waited for the writer's lock")
            .unwrap();
        assert_eq!(stats.total_batches(), 0);
        assert_eq!(outbox.stats_rx().borrow().total_batches(), 0);

        release_tx.send(()).unwrap();
        append.await.unwrap();
        stats_rx.changed().await.unwrap();
        assert_eq!(stats_rx.borrow().get(Stream::Readings).batches, 1);
        assert_eq!(outbox.stats().get(Stream::Readings).bytes, 10);
    }

    #[tokio::test]
    async fn every_change_is_published_and_commit_skips_what_is_already_stored() {
        let store = Arc::new(MemStore::new(25));
        let outbox = Outbox::new(store.clone());
        assert_eq!(outbox.next_seq_at_open(Stream::Alarms), 1);
        assert_eq!(outbox.incarnation(), store.incarnation());
        let batch = |stream, seq| StoredBatch {
            stream,
            seq,
            bytes: vec![1; 10],
        };
        outbox
            .commit(vec![
                batch(Stream::Readings, 1).into(),
                batch(Stream::Alarms, 1).into(),
            ])
            .await
            .unwrap();
        assert_eq!(outbox.stats(), store.stats());
        // A retry of an appended batch is skipped; the third batch evicts the oldest reading.
        let out = outbox
            .commit(vec![
                batch(Stream::Alarms, 1).into(),
                batch(Stream::Audit, 1).into(),
            ])
            .await
            .unwrap();
        assert_eq!(out.evicted, vec![(Stream::Readings, 1, 10)]);
        assert_eq!(outbox.stats().get(Stream::Readings).evicted_batches, 1);
        assert!(outbox.ack(Stream::Alarms, 1).await.unwrap());
        assert_eq!(outbox.stats(), store.stats());
        assert_eq!(outbox.stats().total_batches(), 1);
        let left = outbox.peek(Stream::Audit, 0, 10).await.unwrap();
        assert_eq!(left, vec![batch(Stream::Audit, 1)]);
        // Made before the appends: the handle keeps the numbers it opened with.
        assert_eq!(outbox.next_seq_at_open(Stream::Alarms), 1);
    }
}

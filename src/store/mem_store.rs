//! [`MemStore`]: the outbox in memory, with the same sequence, quota and eviction semantics
//! as [`SledStore`](super::SledStore) (both use the shared ledger). Nothing survives the
//! process; `flush` is a no-op. Used as the model in store tests and as the store in
//! benchmarks of the rest of the pipeline.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::reading::Stream;

use super::ledger::Ledger;
use super::{AppendOutcome, Purged, Store, StoreError, StoreOptions, StoreStats, StoredBatch};

#[derive(Debug)]
pub(super) struct Inner {
    batches: BTreeMap<(Stream, u64), Vec<u8>>,
    pub(super) ledger: Ledger,
    checkpoint: Option<Vec<u8>>,
}

/// An in-memory [`Store`].
#[derive(Debug)]
pub struct MemStore {
    inner: Mutex<Inner>,
    incarnation: u64,
}

impl MemStore {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                batches: BTreeMap::new(),
                ledger: Ledger::new(max_bytes),
                checkpoint: None,
            }),
            incarnation: super::new_incarnation(),
        }
    }

    #[cfg(test)]
    pub(super) fn inner_for_test(&self) -> MutexGuard<'_, Inner> {
        self.inner()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every method leaves `Inner` consistent before it can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append_locked(
        guard: &mut Inner,
        stream: Stream,
        seq: u64,
        bytes: &[u8],
    ) -> Result<AppendOutcome, StoreError> {
        let len = bytes.len() as u64;
        let Inner {
            batches, ledger, ..
        } = guard;
        ledger.check_append(stream, seq, len)?;
        let evicted = ledger.plan_evictions(len, |s| {
            stream_range(batches, s, 0).map(|(seq, v)| Ok((seq, v.len() as u64)))
        })?;
        ledger.record_append(stream, seq, len, &evicted)?;
        for &(s, q, _) in &evicted {
            batches.remove(&(s, q));
        }
        batches.insert((stream, seq), bytes.to_vec());
        Ok(AppendOutcome { evicted })
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new(StoreOptions::default().max_bytes)
    }
}

fn stream_range(
    batches: &BTreeMap<(Stream, u64), Vec<u8>>,
    stream: Stream,
    from_seq: u64,
) -> impl Iterator<Item = (u64, &Vec<u8>)> {
    batches
        .range((stream, from_seq)..=(stream, u64::MAX))
        .map(|(&(_, seq), v)| (seq, v))
}

impl Store for MemStore {
    fn append(&self, stream: Stream, seq: u64, bytes: &[u8]) -> Result<AppendOutcome, StoreError> {
        Self::append_locked(&mut self.inner(), stream, seq, bytes)
    }

    fn append_checkpointed(
        &self,
        stream: Stream,
        seq: u64,
        bytes: &[u8],
        checkpoint: &[u8],
    ) -> Result<AppendOutcome, StoreError> {
        // One lock: the append and the checkpoint change together.
        let mut guard = self.inner();
        let out = Self::append_locked(&mut guard, stream, seq, bytes)?;
        guard.checkpoint = Some(checkpoint.to_vec());
        Ok(out)
    }

    fn put_checkpoint(&self, checkpoint: &[u8]) -> Result<(), StoreError> {
        self.inner().checkpoint = Some(checkpoint.to_vec());
        Ok(())
    }

    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner().checkpoint.clone())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn peek(
        &self,
        stream: Stream,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        let guard = self.inner();
        Ok(stream_range(&guard.batches, stream, from_seq)
            .take(max)
            .map(|(seq, v)| StoredBatch {
                stream,
                seq,
                bytes: v.clone(),
            })
            .collect())
    }

    fn ack(&self, stream: Stream, seq: u64) -> Result<bool, StoreError> {
        let mut guard = self.inner();
        let Inner {
            batches, ledger, ..
        } = &mut *guard;
        match batches.remove(&(stream, seq)) {
            Some(v) => {
                ledger.record_ack(stream, v.len() as u64);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn purge(&self, stream: Stream) -> Result<Purged, StoreError> {
        let mut guard = self.inner();
        let Inner {
            batches, ledger, ..
        } = &mut *guard;
        batches.retain(|(s, _), _| *s != stream);
        Ok(ledger.record_purge(stream))
    }

    fn next_seq(&self, stream: Stream) -> u64 {
        self.inner().ledger.next_seq(stream)
    }

    fn stats(&self) -> StoreStats {
        self.inner().ledger.stats().clone()
    }

    fn incarnation(&self) -> u64 {
        self.incarnation
    }
}

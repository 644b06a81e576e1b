//! [`SledStore`]: the outbox on sled 0.34, in one tree with the layout described in the
//! `store` module docs.
//!
//! Invariant: under the `ledger` lock, the ledger describes exactly the batches in the tree
//! (malformed keys excepted). Every mutation computes the new ledger on a copy, writes the
//! tree, and replaces the ledger only when the write succeeded. `flush` and `peek` do not take
//! the lock.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::reading::Stream;

use super::keys::{self, Key, MetaField};
use super::ledger::Ledger;
use super::recovery;
use super::{AppendOutcome, Store, StoreError, StoreOptions, StoreStats, StoredBatch};

/// The sled tree holding batches and metadata.
pub(crate) const TREE: &str = "outbox";

/// The durable outbox on sled. See the `store` module docs.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    ledger: Mutex<Ledger>,
    recovered_from: Option<PathBuf>,
    malformed_keys: u64,
    incarnation: u64,
}

fn len_u64(bytes: &[u8]) -> u64 {
    bytes.len() as u64
}

impl SledStore {
    /// Opens (or creates) the store at `path`, moving a corrupt one aside (see
    /// [`SledStore::recovered_from`]), and scans it once to rebuild the counters.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<SledStore, StoreError> {
        let (db, recovered_from) = recovery::open_or_recover(path, &opts)?;
        let tree = db.open_tree(TREE)?;
        let mut ledger = Ledger::new(opts.max_bytes);
        let mut malformed_keys = 0u64;
        let mut incarnation = None;
        for item in tree.iter() {
            let (k, v) = item?;
            match keys::decode_key(&k) {
                Key::Batch(stream, seq) => ledger.count_stored(stream, seq, len_u64(&v)),
                Key::Meta(field, stream) => {
                    let value = keys::decode_u64(&v).ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "metadata {field:?} of stream {stream} is {} bytes, expected 8",
                            v.len()
                        ))
                    })?;
                    ledger.restore_meta(field, stream, value);
                }
                Key::Incarnation => {
                    let value = keys::decode_u64(&v).filter(|&i| i != 0).ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "the incarnation id is {} bytes or zero, expected 8 non-zero bytes",
                            v.len()
                        ))
                    })?;
                    incarnation = Some(value);
                }
                Key::Malformed => {
                    malformed_keys += 1;
                    tracing::debug!(key = ?k.as_ref(), "skipping malformed store key");
                }
            }
        }
        if malformed_keys > 0 {
            tracing::warn!(
                path = %path.display(),
                count = malformed_keys,
                "store holds malformed keys; they are skipped"
            );
        }
        let incarnation = match incarnation {
            Some(i) => i,
            // A new store, or one written before incarnation ids: it gets one now, durably,
            // before anything is appended.
            None => {
                let i = super::new_incarnation();
                tree.insert(keys::incarnation_key(), &keys::encode_u64(i)[..])?;
                db.flush()?;
                i
            }
        };
        let stats = ledger.stats();
        tracing::info!(
            path = %path.display(),
            batches = stats.total_batches(),
            bytes = stats.total_bytes(),
            max_bytes = stats.max_bytes,
            incarnation = %format_args!("{incarnation:016x}"),
            "store opened"
        );
        Ok(SledStore {
            db,
            tree,
            ledger: Mutex::new(ledger),
            recovered_from,
            malformed_keys,
            incarnation,
        })
    }

    /// Where a corrupt store was moved at open (`<path>.corrupt-<unix-seconds>`), if it was.
    pub fn recovered_from(&self) -> Option<&Path> {
        self.recovered_from.as_deref()
    }

    /// Keys found at open that are neither a batch nor known metadata; they are ignored.
    pub fn malformed_keys(&self) -> u64 {
        self.malformed_keys
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Nothing under the lock can leave the ledger half-updated (it is replaced whole), so
        // a panic elsewhere while holding it does not make it wrong.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `(seq, bytes)` of `stream`'s batches with seq >= `from_seq`, ascending, values included.
    fn range(
        &self,
        stream: Stream,
        from_seq: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> {
        let lo = keys::batch_key(stream, from_seq);
        let hi = keys::stream_end(stream);
        self.tree
            .range::<&[u8], _>(&lo[..]..&hi[..])
            .filter_map(|item| match item {
                Err(e) => Some(Err(StoreError::from(e))),
                Ok((k, v)) => match keys::decode_key(&k) {
                    Key::Batch(_, seq) => Some(Ok((seq, v))),
                    _ => {
                        tracing::debug!(key = ?k.as_ref(), "skipping malformed store key");
                        None
                    }
                },
            })
    }
}

impl Store for SledStore {
    fn append(&self, stream: Stream, seq: u64, bytes: &[u8]) -> Result<AppendOutcome, StoreError> {
        let len = len_u64(bytes);
        let mut ledger = self.ledger();
        ledger.check_append(stream, seq, len)?;
        let evicted = ledger.plan_evictions(len, |s| {
            self.range(s, 0)
                .map(|item| item.map(|(seq, v)| (seq, len_u64(&v))))
        })?;
        let mut next = ledger.clone();
        next.record_append(stream, seq, len, &evicted);

        let mut batch = sled::Batch::default();
        for &(s, q, _) in &evicted {
            batch.remove(&keys::batch_key(s, q)[..]);
        }
        batch.insert(&keys::batch_key(stream, seq)[..], bytes);
        batch.insert(
            keys::meta_key(MetaField::NextSeq, stream),
            &keys::encode_u64(next.next_seq(stream))[..],
        );
        for s in Stream::ALL
            .into_iter()
            .filter(|s| evicted.iter().any(|e| e.0 == *s))
        {
            for field in [MetaField::EvictedBatches, MetaField::EvictedBytes] {
                batch.insert(
                    keys::meta_key(field, s),
                    &keys::encode_u64(next.meta(field, s))[..],
                );
            }
        }
        self.tree.apply_batch(batch)?;
        *ledger = next;
        drop(ledger);

        if !evicted.is_empty() {
            // The caller audits evictions and raises the alarm; this is for debugging only.
            tracing::debug!(stream = %stream, seq, evicted = evicted.len(), "quota evictions");
        }
        Ok(AppendOutcome { evicted })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn peek(
        &self,
        stream: Stream,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        self.range(stream, from_seq)
            .take(max)
            .map(|item| {
                item.map(|(seq, v)| StoredBatch {
                    stream,
                    seq,
                    bytes: v.to_vec(),
                })
            })
            .collect()
    }

    fn ack(&self, stream: Stream, seq: u64) -> Result<bool, StoreError> {
        let mut ledger = self.ledger();
        match self.tree.remove(keys::batch_key(stream, seq))? {
            Some(v) => {
                ledger.record_ack(stream, len_u64(&v));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn next_seq(&self, stream: Stream) -> u64 {
        self.ledger().next_seq(stream)
    }

    fn stats(&self) -> StoreStats {
        self.ledger().stats().clone()
    }

    fn incarnation(&self) -> u64 {
        self.incarnation
    }
}

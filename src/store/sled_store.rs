//! [`SledStore`]: the outbox on sled 0.34, in one tree with the layout described in the
//! `store` module docs.
//!
//! Invariant: under the `ledger` lock, the ledger describes exactly the batches in the tree
//! (malformed keys excepted). Every mutation computes the new ledger on a copy, writes the
//! tree, and replaces the ledger only when the write succeeded. `flush` and `peek` do not take
//! the ledger lock.
//!
//! # Reopening in place
//!
//! Once sled's log fails a write (a full disk, EFBIG, EIO) sled keeps the error as a global
//! error and fails every later write with it, even after the cause is gone.
//! [`Store::reopen`] drops the sled handles and opens the same path again behind the same
//! `SledStore`, rebuilding the ledger from what sled recovers from disk: committed batches
//! are all there; batches appended after the last successful flush may or may not be, which
//! is why the committer re-appends what it holds (a batch found again is skipped). The
//! ledger is rebuilt from disk alone, so a staged batch that did not survive can be appended
//! again under its own sequence number. While a reopen has failed (sled
//! would not open yet), the store is *closed*: every call returns [`StoreError::Closed`]
//! until a later reopen succeeds.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use crate::reading::Stream;

use super::keys::{self, Key, MetaField};
use super::ledger::Ledger;
use super::manifest::{self, Manifest, StreamMark};
use super::recovery;
use super::{
    AppendOutcome, Purged, Recovery, Store, StoreError, StoreOptions, StoreStats, StoredBatch,
};

/// The sled tree holding batches and metadata.
pub(crate) const TREE: &str = "outbox";
/// How long a reopen waits for the dropped handles' file lock (sled's I/O threads let go of
/// the file shortly after the `Db` is dropped).
const REOPEN_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The open sled handles.
#[derive(Debug)]
struct Engine {
    db: sled::Db,
    tree: sled::Tree,
}

/// What a scan of the tree at open found.
struct Scan {
    ledger: Ledger,
    malformed_keys: u64,
    incarnation: Option<u64>,
}

/// The durable outbox on sled. See the `store` module docs.
#[derive(Debug)]
pub struct SledStore {
    path: PathBuf,
    opts: StoreOptions,
    /// `None` while closed (a reopen failed).
    engine: RwLock<Option<Engine>>,
    ledger: Mutex<Ledger>,
    recovery: Option<Recovery>,
    malformed_keys: u64,
    incarnation: u64,
    /// Test hook: make every write fail as a poisoned sled does, until the next reopen.
    #[cfg(test)]
    poisoned: std::sync::atomic::AtomicBool,
}

fn len_u64(bytes: &[u8]) -> u64 {
    bytes.len() as u64
}

fn scan(tree: &sled::Tree, max_bytes: u64) -> Result<Scan, StoreError> {
    let mut ledger = Ledger::new(max_bytes);
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
            // Read on demand (`Store::checkpoint`); its bytes are the pipeline's to check.
            Key::Checkpoint => {}
            Key::Malformed => {
                malformed_keys += 1;
                tracing::debug!(key = ?k.as_ref(), "skipping malformed store key");
            }
        }
    }
    Ok(Scan {
        ledger,
        malformed_keys,
        incarnation,
    })
}

/// Whether the store just scanned lost entries or holds absurd state: why, and how many
/// batches are lost with it (see `manifest.rs`).
fn damage(path: &Path, found: &Scan) -> Option<(String, u64)> {
    let stored = found.ledger.stats().total_batches();
    if let Some((what, stream, value)) = found.ledger.absurd() {
        return Some((
            format!("absurd sequence state: {what} of stream {stream} is {value}"),
            stored,
        ));
    }
    let m = match manifest::read(path) {
        Ok(Some(m)) => m,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "store manifest unreadable; not checked");
            return None;
        }
    };
    let mut why = Vec::new();
    let mut lost = 0u64;
    for s in Stream::ALL {
        let want = m.streams[s.index()];
        let next_seq = found.ledger.next_seq(s);
        let accounted = found.ledger.accounted(s);
        if next_seq < want.next_seq || accounted < want.accounted {
            why.push(format!(
                "{s}: next_seq {next_seq} (manifest {}), batches accounted {accounted} \
                 (manifest {})",
                want.next_seq, want.accounted
            ));
            lost += want
                .batches
                .min(want.accounted.saturating_sub(accounted))
                .max(1);
        }
    }
    if why.is_empty() {
        return None;
    }
    Some((
        format!(
            "entries lost since the last flush's manifest: {}",
            why.join("; ")
        ),
        lost.max(stored),
    ))
}

/// Batches the manifest of a store moved aside says it held (0 without one).
fn manifest_batches(moved: &Path) -> u64 {
    match manifest::read(moved) {
        Ok(Some(m)) => m.streams.iter().map(|s| s.batches).sum(),
        _ => 0,
    }
}

/// Persists `id` as the store's incarnation id, durably.
fn write_incarnation(engine: &Engine, id: u64) -> Result<(), StoreError> {
    engine
        .tree
        .insert(keys::incarnation_key(), &keys::encode_u64(id)[..])?;
    engine.db.flush()?;
    Ok(())
}

impl SledStore {
    /// [`Store::append`], with the checkpoint replaced in the same atomic write if given.
    fn append_with(
        &self,
        stream: Stream,
        seq: u64,
        bytes: &[u8],
        checkpoint: Option<&[u8]>,
    ) -> Result<AppendOutcome, StoreError> {
        let len = len_u64(bytes);
        let mut ledger = self.ledger();
        ledger.check_append(stream, seq, len)?;
        let engine = self.engine();
        let Engine { tree, .. } = engine.as_ref().ok_or(StoreError::Closed)?;
        self.check_poisoned()?;
        let evicted = ledger.plan_evictions(len, |s| {
            Self::range(tree, s, 0).map(|item| item.map(|(seq, v)| (seq, len_u64(&v))))
        })?;
        let mut next = ledger.clone();
        next.record_append(stream, seq, len, &evicted)?;

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
        if let Some(c) = checkpoint {
            batch.insert(keys::checkpoint_key(), c);
        }
        tree.apply_batch(batch)?;
        drop(engine);
        *ledger = next;
        drop(ledger);

        if !evicted.is_empty() {
            // The caller audits evictions and raises the alarm; this is for debugging only.
            tracing::debug!(stream = %stream, seq, evicted = evicted.len(), "quota evictions");
        }
        Ok(AppendOutcome { evicted })
    }

    /// Opens (or creates) the store at `path`, moving a corrupt one aside (see
    /// [`SledStore::recovered_from`]), and scans it once to rebuild the counters.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<SledStore, StoreError> {
        let (db, moved) = recovery::open_or_recover(path, &opts)?;
        let tree = db.open_tree(TREE)?;
        let mut engine = Engine { db, tree };
        let scanned = scan(&engine.tree, opts.max_bytes);
        let mut recovery = moved.map(|moved_to| Recovery {
            batches_lost: manifest_batches(&moved_to),
            reason: "sled could not open it".into(),
            moved_to,
        });
        let damaged = match &scanned {
            _ if recovery.is_some() => None,
            Ok(found) => damage(path, found),
            // Metadata that cannot be read: nothing of it can be trusted.
            Err(StoreError::Corrupt(msg)) => {
                Some((format!("unreadable: {msg}"), manifest_batches(path).max(1)))
            }
            Err(_) => None,
        };
        let found = match damaged {
            None => scanned?,
            Some((reason, batches_lost)) => {
                drop(engine);
                let moved_to = recovery::move_aside(path)?;
                tracing::error!(
                    path = %path.display(),
                    moved_to = %moved_to.display(),
                    reason = %reason,
                    batches_lost,
                    "store damaged: entries were lost; moved aside and started empty"
                );
                engine = open_engine(path, &opts)?;
                recovery = Some(Recovery {
                    moved_to,
                    batches_lost,
                    reason,
                });
                scan(&engine.tree, opts.max_bytes)?
            }
        };
        let Scan {
            ledger,
            malformed_keys,
            incarnation,
        } = found;
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
                write_incarnation(&engine, i)?;
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
            path: path.to_path_buf(),
            opts,
            engine: RwLock::new(Some(engine)),
            ledger: Mutex::new(ledger),
            recovery,
            malformed_keys,
            incarnation,
            #[cfg(test)]
            poisoned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Where a corrupt store was moved at open (`<path>.corrupt-<unix-seconds>`), if it was.
    pub fn recovered_from(&self) -> Option<&Path> {
        self.recovery.as_ref().map(|r| r.moved_to.as_path())
    }

    /// Keys found at open that are neither a batch nor known metadata; they are ignored.
    pub fn malformed_keys(&self) -> u64 {
        self.malformed_keys
    }

    /// Test hook: every later write fails like a poisoned sled until [`Store::reopen`].
    #[cfg(test)]
    pub(crate) fn poison_for_test(&self) {
        self.poisoned
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    #[cfg(test)]
    fn check_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(
                "injected: sled keeps a global error",
            ))));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn check_poisoned(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Nothing under the lock can leave the ledger half-updated (it is replaced whole), so
        // a panic elsewhere while holding it does not make it wrong.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn engine(&self) -> RwLockReadGuard<'_, Option<Engine>> {
        // The engine is replaced whole under the write lock; a panic cannot leave it half set.
        self.engine.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// `(seq, bytes)` of `stream`'s batches with seq >= `from_seq`, ascending, values included.
    fn range(
        tree: &sled::Tree,
        stream: Stream,
        from_seq: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> {
        let lo = keys::batch_key(stream, from_seq);
        let hi = keys::stream_end(stream);
        tree.range::<&[u8], _>(&lo[..]..&hi[..])
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

    /// The counters to record in the manifest, as they are now.
    fn manifest_now(&self) -> Manifest {
        let ledger = self.ledger();
        Manifest {
            incarnation: self.incarnation,
            streams: Stream::ALL.map(|s| StreamMark {
                next_seq: ledger.next_seq(s),
                batches: ledger.stream(s).batches,
                accounted: ledger.accounted(s),
            }),
        }
    }
}

/// Opens sled at `path`, waiting a bounded time for the lock that just-dropped handles of
/// this process still hold.
fn open_engine(path: &Path, opts: &StoreOptions) -> Result<Engine, StoreError> {
    let deadline = Instant::now() + REOPEN_LOCK_WAIT;
    loop {
        match recovery::config(path, opts).open() {
            Ok(db) => {
                let tree = db.open_tree(TREE)?;
                return Ok(Engine { db, tree });
            }
            Err(e) if e.to_string().contains("could not acquire lock") => {
                if Instant::now() >= deadline {
                    return Err(e.into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Store for SledStore {
    fn append(&self, stream: Stream, seq: u64, bytes: &[u8]) -> Result<AppendOutcome, StoreError> {
        self.append_with(stream, seq, bytes, None)
    }

    fn append_checkpointed(
        &self,
        stream: Stream,
        seq: u64,
        bytes: &[u8],
        checkpoint: &[u8],
    ) -> Result<AppendOutcome, StoreError> {
        self.append_with(stream, seq, bytes, Some(checkpoint))
    }

    fn put_checkpoint(&self, checkpoint: &[u8]) -> Result<(), StoreError> {
        let engine = self.engine();
        let Engine { tree, .. } = engine.as_ref().ok_or(StoreError::Closed)?;
        self.check_poisoned()?;
        tree.insert(keys::checkpoint_key(), checkpoint)?;
        Ok(())
    }

    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let engine = self.engine();
        let Engine { tree, .. } = engine.as_ref().ok_or(StoreError::Closed)?;
        Ok(tree.get(keys::checkpoint_key())?.map(|v| v.to_vec()))
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Taken before the flush: everything it counts was written before the flush began, so
        // it is durable once the flush returns (see `manifest.rs`).
        let marks = self.manifest_now();
        let engine = self.engine();
        let Engine { db, .. } = engine.as_ref().ok_or(StoreError::Closed)?;
        self.check_poisoned()?;
        db.flush()?;
        drop(engine);
        manifest::write(&self.path, &marks).map_err(|source| StoreError::Io {
            path: manifest::path(&self.path),
            source,
        })?;
        Ok(())
    }

    fn peek(
        &self,
        stream: Stream,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        let engine = self.engine();
        let Engine { tree, .. } = engine.as_ref().ok_or(StoreError::Closed)?;
        Self::range(tree, stream, from_seq)
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
        let engine = self.engine();
        let Engine { tree, .. } = engine.as_ref().ok_or(StoreError::Closed)?;
        self.check_poisoned()?;
        let key = keys::batch_key(stream, seq);
        let Some(v) = tree.get(key)? else {
            return Ok(false);
        };
        let mut next = ledger.clone();
        next.record_ack(stream, len_u64(&v));
        // The delete and the acknowledged count change together, so the batches accounted
        // for (manifest.rs) never drop.
        let mut batch = sled::Batch::default();
        batch.remove(&key[..]);
        batch.insert(
            keys::meta_key(MetaField::AckedBatches, stream),
            &keys::encode_u64(next.meta(MetaField::AckedBatches, stream))[..],
        );
        tree.apply_batch(batch)?;
        *ledger = next;
        Ok(true)
    }

    fn purge(&self, stream: Stream) -> Result<Purged, StoreError> {
        let mut ledger = self.ledger();
        let engine = self.engine();
        let Engine { tree, .. } = engine.as_ref().ok_or(StoreError::Closed)?;
        self.check_poisoned()?;
        let mut batch = sled::Batch::default();
        for item in Self::range(tree, stream, 0) {
            let (seq, _) = item?;
            batch.remove(&keys::batch_key(stream, seq)[..]);
        }
        let mut next = ledger.clone();
        let purged = next.record_purge(stream);
        batch.insert(
            keys::meta_key(MetaField::PurgedBatches, stream),
            &keys::encode_u64(next.meta(MetaField::PurgedBatches, stream))[..],
        );
        tree.apply_batch(batch)?;
        *ledger = next;
        Ok(purged)
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

    fn recovery(&self) -> Option<Recovery> {
        self.recovery.clone()
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let mut ledger = self.ledger();
        let mut engine = self.engine.write().unwrap_or_else(PoisonError::into_inner);
        // Drop the old handles first: sled holds a lock on its files.
        drop(engine.take());
        let fresh = open_engine(&self.path, &self.opts)?;
        let found = scan(&fresh.tree, self.opts.max_bytes)?;
        match found.incarnation {
            Some(i) if i != self.incarnation => {
                return Err(StoreError::Corrupt(format!(
                    "the store at {} was replaced while open (incarnation {i:016x}, expected \
                     {:016x})",
                    self.path.display(),
                    self.incarnation
                )));
            }
            Some(_) => {}
            None => write_incarnation(&fresh, self.incarnation)?,
        }
        // The ledger is what is on disk, nothing more: a batch staged before the failure that
        // did not survive must be appended again, so its sequence number may not count as
        // used (the committer takes `SeqRegression` for "already stored"). Uncommitted
        // batches were never sent, so no sequence number the hub has seen is handed out again.
        let rebuilt = found.ledger;
        #[cfg(test)]
        self.poisoned
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let stats = rebuilt.stats();
        tracing::warn!(
            path = %self.path.display(),
            batches = stats.total_batches(),
            bytes = stats.total_bytes(),
            "store reopened"
        );
        *ledger = rebuilt;
        *engine = Some(fresh);
        Ok(())
    }
}

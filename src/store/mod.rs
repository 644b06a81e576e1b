//! The durable outbox: sealed batches wait here while the uplink is down.
//!
//! Every batch that leaves the seal stage is appended here under its stream and sequence
//! number, made durable by a group commit ([`Store::flush`], at most once a second), sent by
//! the uplink once committed, and deleted only when the hub acknowledges it ([`Store::ack`]).
//! [`SledStore`] is the production implementation; [`MemStore`] has the same semantics in
//! memory and serves as the model in tests and as the store in pipeline benchmarks.
//!
//! # Key layout
//!
//! One sled tree, `outbox`, holds everything, so one `sled::Batch` can change batches and
//! metadata atomically (sled seals a batch in its log so recovery replays all of it or none):
//!
//! | key | value |
//! |---|---|
//! | `[stream code] ‖ seq (u64 big-endian)` — 9 bytes | the sealed envelope, byte for byte |
//! | `0xFF ‖ "next_seq/<stream>"` | u64 big-endian: first sequence number not yet used |
//! | `0xFF ‖ "evicted_batches/<stream>"` | u64 big-endian: batches dropped by the quota, ever |
//! | `0xFF ‖ "evicted_bytes/<stream>"` | u64 big-endian: bytes dropped by the quota, ever |
//! | `0xFF ‖ "acked_batches/<stream>"` | u64 big-endian: batches deleted on acknowledgement, ever (in the same `sled::Batch` as the delete) |
//! | `0xFF ‖ "purged_batches/<stream>"` | u64 big-endian: batches destroyed by [`Store::purge`], ever (in the same `sled::Batch` as the deletes) |
//! | `0xFF ‖ "incarnation"` | u64 big-endian, never 0: this store's [incarnation id](Store::incarnation) |
//! | `0xFF ‖ "checkpoint"` | the pipeline's last [checkpoint](Store::checkpoint) (opaque, encrypted by the pipeline), written in the same `sled::Batch` as the batch it belongs to |
//!
//! Stream codes are [`Stream::code`] (0 readings, 1 alarms, 2 audit), so iteration order is
//! stream, then sequence number, and the metadata sorts after every batch. Anything else in
//! the tree (a key of the wrong length, an unknown stream code, an unknown metadata name) is
//! skipped and counted ([`SledStore::malformed_keys`]), never trusted and never a panic.
//!
//! # Commit semantics
//!
//! - [`Store::append`] stages a batch. The insert, the stream's new `next_seq` and any
//!   evictions it caused go into one `sled::Batch`: after a crash the high-water mark is
//!   never behind a batch that survived, so sequence numbers never repeat, even after every
//!   batch was acknowledged and deleted.
//! - [`Store::flush`] calls `sled::Db::flush`: a batch is *committed* once a flush that
//!   started after its append returned `Ok`. Flushes do not hold the store's lock, so appends
//!   continue while a group commit is in progress.
//! - On Linux sled's flush writes its log with `pwrite` and `sync_file_range`, not `fsync`:
//!   that makes a committed batch survive a **process crash** (SIGKILL, panic, OOM kill). It
//!   does not by itself survive **power loss**; for that we keep sled's background flusher at
//!   `flush_every_ms = Some(1000)`, which runs `sync_all` once a second, so power loss can cost
//!   up to about a second of batches that were already reported committed.
//! - [`Store::ack`] deletes a batch; the delete is durable at the next flush. A delete lost in a
//!   crash only means the batch is sent again (the hub de-duplicates on stream and seq).
//!
//! # Quota policy
//!
//! `max_bytes` bounds the sum of the stored envelopes' lengths (keys, metadata and sled's own
//! overhead are not counted: sled needs several times the live data on disk and does not give
//! space back after a drain, so size the partition for that). When a new batch does not fit,
//! the oldest `readings` batches are evicted first, then the oldest `alarms`, then the oldest
//! `audit`, until it fits; the evictions are returned to the caller (who audits them and raises
//! an alarm) and counted per stream, persistently. A batch larger than `max_bytes` on its own is
//! refused with [`StoreError::TooLarge`]. A refused append changes nothing, not even `next_seq`.
//! If `max_bytes` is lowered between runs, the excess is evicted by the next append.
//!
//! # Memory
//!
//! sled's cache defaults to 1 GiB; we always pass [`StoreOptions::cache_capacity_bytes`]
//! (4 MiB by default) and use `Mode::LowSpace`. Per-stream counts and byte totals live in
//! memory behind a mutex, computed once at open by scanning the tree (O(stored data) at
//! start-up), so [`Store::stats`] is O(1).
//!
//! # Recovery and how it fails
//!
//! - sled 0.34 is known to fail to open after abrupt stops (corrupt snapshots, CRC
//!   mismatches, sometimes a panic). If opening fails with a corruption-type error, or sled
//!   panics while opening, the directory is moved aside to `<path>.corrupt-<unix-seconds>`, a
//!   fresh store is opened in its place, an ERROR is logged and [`SledStore::recovered_from`]
//!   returns the moved path so the gateway raises an alarm. The moved data is kept for
//!   forensics, not deleted. The fresh store's sequence numbers start again at 1.
//! - sled can also open a damaged store *successfully* with entries missing (bytes flipped in
//!   `db`, a zero-length, random or missing `db`). After every successful flush the store
//!   writes a checksummed manifest beside sled's files (`<path>/manifest`, see
//!   `manifest.rs`): per stream the sequence high-water mark and the batches accounted for
//!   (stored + acknowledged + evicted, which never goes down). An open that finds less than
//!   the manifest recorded, or absurd sequence state (any sequence number or counter at or
//!   above 2^62, e.g. a key or `next_seq` at `u64::MAX`), moves the directory aside the same
//!   way. [`Store::recovery`] then says where it went, why, and how many batches it held;
//!   the gateway counts it (`store_recoveries`, `batches_lost_to_corruption`) and sends a
//!   `store_recovered` alarm record on the alarms stream.
//! - Plain I/O errors at open (permission denied, the path is a file, the lock is held by a
//!   running instance, disk full) are returned as they are: moving a healthy store aside
//!   because of them would lose data.
//! - A metadata value that is not 8 bytes is never guessed: the store is treated as damaged
//!   and moved aside like the cases above (the fresh store is a new incarnation, so nothing
//!   it sends can be taken for a replay of the old one's sequence numbers).
//! - A full disk surfaces as a sled I/O error; [`StoreError::is_disk_full`] recognises it so
//!   the caller can degrade (hold, drop and count) instead of exiting. sled keeps a failed
//!   write as a global error and fails every later one, even after space returns:
//!   [`Store::reopen`] drops its handles and opens the same path again in place (see
//!   `sled_store.rs`); the committer calls it when commits keep failing.
//! - All calls block (sled I/O, `flush` can take hundreds of milliseconds at p99). Async code
//!   never holds a [`Store`]: it holds an [`Outbox`], which makes every call on a blocking
//!   thread and publishes [`StoreStats`] through a `watch` so readers never take the ledger
//!   lock (see `outbox.rs`).

mod check;
mod error;
mod keys;
mod ledger;
mod manifest;
mod mem_store;
mod outbox;
mod recovery;
mod sled_store;

#[cfg(test)]
mod tests;

pub(crate) use check::check as check_offline;
pub(crate) use error::StoreError;
pub use mem_store::MemStore;
pub(crate) use outbox::{CommitOutcome, Outbox, Staged};

pub use sled_store::SledStore;

use crate::reading::Stream;

/// A durable, bounded, per-stream ordered outbox of sealed batches.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Stage a sealed batch. Not durable until `flush`. `seq` must be >= next_seq(stream)
    /// (else [`StoreError::SeqRegression`]).
    ///
    /// Enforces the byte quota: if the batch does not fit, evicts the oldest batches — all
    /// `Readings` first, then `Alarms`, then `Audit` — until it fits; evictions are returned
    /// and counted.
    fn append(&self, stream: Stream, seq: u64, bytes: &[u8]) -> Result<AppendOutcome, StoreError>;

    /// [`Store::append`], and replaces the checkpoint with `checkpoint` in the same atomic
    /// write: after a crash both are there or neither is.
    fn append_checkpointed(
        &self,
        stream: Stream,
        seq: u64,
        bytes: &[u8],
        checkpoint: &[u8],
    ) -> Result<AppendOutcome, StoreError>;

    /// Replaces the checkpoint (staged like an append; durable at the next flush).
    fn put_checkpoint(&self, checkpoint: &[u8]) -> Result<(), StoreError>;

    /// The last checkpoint written, if any: the pipeline's state that goes with the batches
    /// stored (see `pipeline::checkpoint`).
    fn checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError>;

    /// Make everything appended so far durable (group commit). A batch is "committed" once a
    /// flush after its append returned Ok.
    fn flush(&self) -> Result<(), StoreError>;

    /// Committed-or-staged batches of `stream` with seq >= from_seq, ascending, at most `max`.
    fn peek(
        &self,
        stream: Stream,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StoredBatch>, StoreError>;

    /// Delete an acknowledged batch; Ok(true) if it was there. Deleting is durable at the next
    /// flush.
    fn ack(&self, stream: Stream, seq: u64) -> Result<bool, StoreError>;

    /// The first sequence number not yet used on `stream` (starts at 1); continues across
    /// restarts even when every batch has been acked and deleted.
    fn next_seq(&self, stream: Stream) -> u64;

    fn stats(&self) -> StoreStats;

    /// Destroys every batch `stream` holds, acknowledged or not (the end of an emergency
    /// collection); durable at the next flush. The deletes and the stream's purged count change
    /// in one atomic write, so the batches accounted for never drop; `next_seq` is kept, so the
    /// stream's sequence numbers never repeat.
    fn purge(&self, stream: Stream) -> Result<Purged, StoreError>;

    /// This store's incarnation id: a random non-zero number drawn when the store was
    /// created and kept with it for its whole life (persisted; stable across reopen). A store
    /// moved aside and replaced by a fresh one, or lost and recreated, has a new one, so
    /// `(incarnation, stream, seq)` names a batch even when sequence numbers start again.
    fn incarnation(&self) -> u64;

    /// Drops the storage engine's handles and opens the same store again in place, for an
    /// engine that keeps failing after the cause of an I/O error is gone (sled after ENOSPC).
    /// Committed batches survive it; staged ones may not (append them again). Stores that
    /// cannot be poisoned do nothing.
    fn reopen(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether this store replaced a damaged one at open (see [`Recovery`]).
    fn recovery(&self) -> Option<Recovery> {
        None
    }
}

/// A damaged store found at open and moved aside: the gateway raises an alarm with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the damaged store is kept (`<path>.corrupt-<unix-seconds>`); never deleted.
    pub moved_to: std::path::PathBuf,
    /// Batches that will not be delivered: what the damaged store held (at least), from its
    /// manifest where it had one.
    pub batches_lost: u64,
    /// What was wrong.
    pub reason: String,
}

/// A random non-zero incarnation id.
pub(crate) fn new_incarnation() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// One stored batch, as [`Store::peek`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub stream: Stream,
    pub seq: u64,
    pub bytes: Vec<u8>,
}

/// What a [`Store::purge`] destroyed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub batches: u64,
    pub bytes: u64,
}

/// What an append had to do to make room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Batches dropped by the quota, oldest first: (stream, seq, bytes).
    pub evicted: Vec<(Stream, u64, u64)>,
}

/// Counters for one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Batches stored now.
    pub batches: u64,
    /// Envelope bytes stored now.
    pub bytes: u64,
    /// Batches dropped by the quota since the store was created (persisted).
    pub evicted_batches: u64,
    /// Bytes dropped by the quota since the store was created (persisted).
    pub evicted_bytes: u64,
    /// Batches deleted on acknowledgement since the store was created (persisted).
    pub acked_batches: u64,
    /// Batches destroyed by [`Store::purge`] since the store was created (persisted).
    pub purged_batches: u64,
}

/// A snapshot of the store's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// By [`Stream::index`].
    pub streams: [StreamStats; Stream::COUNT],
    /// The configured quota.
    pub max_bytes: u64,
}

impl StoreStats {
    pub fn get(&self, stream: Stream) -> &StreamStats {
        &self.streams[stream.index()]
    }

    pub(crate) fn get_mut(&mut self, stream: Stream) -> &mut StreamStats {
        &mut self.streams[stream.index()]
    }

    pub fn total_batches(&self) -> u64 {
        Stream::ALL.iter().map(|s| self.get(*s).batches).sum()
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        Stream::ALL.iter().map(|s| self.get(*s).bytes).sum()
    }
}

/// Sizing of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Quota on the sum of stored envelope lengths.
    pub max_bytes: u64,
    /// sled's page cache (its own default is 1 GiB; never use that on a gateway).
    pub cache_capacity_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            cache_capacity_bytes: 4 * 1024 * 1024,
        }
    }
}

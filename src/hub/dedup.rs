//! Persisted de-duplication of batches on (gateway, stream, incarnation, seq), in sled.
//!
//! Gateways send each stream in sequence order, but re-send unacknowledged batches after a
//! timeout and after every reconnect, and their outbox may drop batches under its quota (leaving
//! gaps that never fill). A gateway's sequence numbers are scoped by its store's **incarnation**
//! (a random id made with the store, carried in every envelope header since envelope version 2;
//! version 1 envelopes count as incarnation 0): a store that was lost and replaced starts a new
//! incarnation whose seqs have nothing to do with the old ones. Per (gateway, stream,
//! incarnation) the hub keeps the accepted sequence numbers as a [`SeqWindow`]:
//!
//! - `floor`: every seq **below** it counts as done (accepted, or a gap that was given up);
//! - `runs`: the accepted seqs at or above `floor` as disjoint, non-adjacent inclusive ranges,
//!   at most [`MAX_RUNS`] of them.
//!
//! Marking a seq extends or joins runs (in-order traffic therefore keeps one run, whatever the
//! first seq was: a window never assumes seqs start at 0). Each gap between runs is a batch
//! lost at the gateway or one still to come; a late batch in a gap is [`Seen::New`] and is
//! written. When a mark would make more than [`MAX_RUNS`] runs, the lowest run and every gap
//! below it are given up: `floor` moves just past that run. A seq below `floor` is then either
//! accepted or given up, and is reported [`Seen::BelowWindow`] (before any gap was given up,
//! [`Seen::Duplicate`]). Either way the hub acknowledges it without writing it: a duplicate can
//! not occur, at the price of dropping a batch that arrives after more than 1024 later gaps.
//!
//! # Bounded state
//!
//! A window is at most 17 + 16 × 1024 bytes (in-order traffic: 33 bytes). Each (gateway,
//! stream) keeps the windows of at most [`MAX_INCARNATIONS`] incarnations: marking the first
//! batch of a new incarnation beyond that deletes the window used least recently (a gateway
//! sends from one store at a time, so only a store thought lost that comes back after eight
//! replacements could be written twice).
//!
//! # Layout
//!
//! Tree `windows`; key = gateway id bytes ‖ 0x00 ‖ stream code ‖ incarnation u64 big-endian
//! (gateway ids never contain 0x00); value = `flags` u8 (bit 0: a gap was given up) ‖ `used_ms`
//! i64 big-endian (hub clock when last marked) ‖ `floor` u64 big-endian ‖ per run `start` u64 ‖
//! `end` u64 (inclusive), big-endian, ascending. A value that does not have this shape (unknown
//! flags, a length that is not 17 + 16k, runs out of order, overlapping, adjacent or below the
//! floor, more than the bound) is [`DedupError::Corrupt`]: guessing could accept a replay, so the
//! batch is refused (not acked) and an operator decides.
//!
//! State written by hubs before incarnations (tree `dedup`, key without incarnation, value
//! `gave_up` u8 ‖ `floor` u64 ‖ accepted seqs u64) is converted into incarnation-0 windows when
//! the state is opened, then that tree is dropped.
//!
//! # Durability
//!
//! [`Dedup::mark`] is staged; it is durable once [`Dedup::flush`] returns (sled's flush: survives
//! a process crash; sled's background `sync_all` every second bounds what power loss can take).
//! sled's page cache is capped at [`CACHE_CAPACITY_BYTES`]. All calls block: the hub makes them
//! on blocking threads ([`HubProcess`](super::HubProcess) opens the state in `spawn_blocking`,
//! and `service` ingests there), never on an async worker.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use crate::reading::{now_ms, GatewayId, Stream, TimestampMs};

use super::BatchKey;

/// Most runs of accepted seqs kept per window.
pub(crate) const MAX_RUNS: usize = 1024;
/// Most incarnations whose windows are kept per (gateway, stream).
pub(crate) const MAX_INCARNATIONS: usize = 8;
/// sled page cache of the de-dup state.
pub(crate) const CACHE_CAPACITY_BYTES: u64 = 8 * 1024 * 1024;
const BACKGROUND_FSYNC_MS: u64 = 1000;
const TREE: &str = "windows";
/// The tree of the layout before incarnations, converted at open.
const LEGACY_TREE: &str = "dedup";
const FLAG_GAVE_UP: u8 = 1;
const VALUE_FIXED_LEN: usize = 1 + 8 + 8;

/// Whether a batch was seen before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    New,
    /// Accepted before.
    Duplicate,
    /// Below the floor of a window that gave up a gap: accepted before, or given up.
    BelowWindow,
}

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("de-dup state: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "de-dup state of {gateway}/{stream} incarnation {incarnation:016x} is corrupt: {reason}"
    )]
    Corrupt {
        gateway: GatewayId,
        stream: Stream,
        incarnation: u64,
        reason: String,
    },
    #[error("de-dup state {key} (layout before incarnations) is corrupt: {reason}")]
    LegacyCorrupt { key: String, reason: String },
}

/// The accepted seqs of one (gateway, stream, incarnation). See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SeqWindow {
    pub floor: u64,
    /// Accepted runs at or above `floor`: start → end, inclusive, disjoint, non-adjacent.
    pub runs: BTreeMap<u64, u64>,
    /// Whether a gap was ever given up: then a seq below `floor` may never have been accepted,
    /// and [`SeqWindow::check`] says [`Seen::BelowWindow`] instead of [`Seen::Duplicate`].
    pub gave_up: bool,
    /// Hub clock when the window was last marked: orders incarnations for eviction.
    pub used_ms: TimestampMs,
}

impl SeqWindow {
    /// Whether `seq` was accepted (or lies below the floor).
    pub(crate) fn check(&self, seq: u64) -> Seen {
        if seq < self.floor {
            return if self.gave_up {
                Seen::BelowWindow
            } else {
                Seen::Duplicate
            };
        }
        match self.runs.range(..=seq).next_back() {
            Some((_, &end)) if end >= seq => Seen::Duplicate,
            _ => Seen::New,
        }
    }

    /// Records `seq` as accepted, joining runs, and gives up the lowest gaps beyond the bound.
    pub(crate) fn mark(&mut self, seq: u64) {
        if self.check(seq) != Seen::New {
            return;
        }
        // Extend the run ending just below, or start a new one.
        let below = self
            .runs
            .range(..seq)
            .next_back()
            .filter(|(_, &end)| end.checked_add(1) == Some(seq))
            .map(|(&start, _)| start);
        let start = below.unwrap_or(seq);
        let mut end = seq;
        // Absorb the run starting just above.
        if let Some(next) = seq.checked_add(1) {
            if let Some(next_end) = self.runs.remove(&next) {
                end = next_end;
            }
        }
        self.runs.insert(start, end);
        self.compact();
        while self.runs.len() > MAX_RUNS {
            let Some((_, end)) = self.runs.pop_first() else {
                break;
            };
            self.gave_up = true;
            match end.checked_add(1) {
                Some(f) => self.floor = f,
                None => {
                    // Everything up to u64::MAX is done.
                    self.floor = u64::MAX;
                    self.runs.clear();
                    self.runs.insert(u64::MAX, u64::MAX);
                }
            }
            self.compact();
        }
    }

    /// Moves `floor` past a run that starts at it.
    fn compact(&mut self) {
        if let Some((&start, &end)) = self.runs.first_key_value() {
            if start == self.floor {
                if let Some(f) = end.checked_add(1) {
                    self.runs.remove(&start);
                    self.floor = f;
                }
            }
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VALUE_FIXED_LEN + 16 * self.runs.len());
        out.push(if self.gave_up { FLAG_GAVE_UP } else { 0 });
        out.extend_from_slice(&self.used_ms.to_be_bytes());
        out.extend_from_slice(&self.floor.to_be_bytes());
        for (start, end) in &self.runs {
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&end.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<SeqWindow, String> {
        let (&flags, rest) = bytes.split_first().ok_or("empty value")?;
        if flags & !FLAG_GAVE_UP != 0 {
            return Err(format!("unknown flags {flags:#04x}"));
        }
        if bytes.len() < VALUE_FIXED_LEN || (bytes.len() - VALUE_FIXED_LEN) % 16 != 0 {
            return Err(format!("{} bytes is not 17 + 16k", bytes.len()));
        }
        let mut words = rest.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            b
        });
        let mut next = || words.next().ok_or("truncated");
        let used_ms = i64::from_be_bytes(next()?);
        let floor = u64::from_be_bytes(next()?);
        let mut runs = BTreeMap::new();
        // The lowest seq the next run may start at.
        let mut min_start = Some(floor);
        while let Ok(start) = next() {
            let (start, end) = (u64::from_be_bytes(start), u64::from_be_bytes(next()?));
            if min_start.map_or(true, |m| start < m) || end < start {
                return Err(format!("run {start}..={end} out of order (floor {floor})"));
            }
            runs.insert(start, end);
            // Runs are never adjacent: the next starts at least two above this end.
            min_start = end.checked_add(2);
        }
        if runs.len() > MAX_RUNS {
            return Err(format!("{} runs", runs.len()));
        }
        Ok(SeqWindow {
            floor,
            runs,
            gave_up: flags & FLAG_GAVE_UP != 0,
            used_ms,
        })
    }

    /// A window of the layout before incarnations: `gave_up` u8 ‖ floor ‖ accepted seqs.
    fn decode_legacy(bytes: &[u8]) -> Result<SeqWindow, String> {
        let (flag, rest) = bytes.split_first().ok_or("empty value")?;
        if *flag > 1 || rest.len() % 8 != 0 || rest.is_empty() {
            return Err(format!("{} bytes, flag {flag}", bytes.len()));
        }
        let mut seqs = rest.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        });
        let floor = seqs.next().ok_or("no floor")?;
        let mut w = SeqWindow {
            floor,
            gave_up: *flag == 1,
            ..SeqWindow::default()
        };
        for s in seqs {
            if s < floor {
                return Err(format!("seq {s} below the floor {floor}"));
            }
            w.mark(s);
        }
        Ok(w)
    }
}

/// Attempts to take sled's lock while a previous instance in this process finishes its
/// background writes, [`LOCK_RETRY_INTERVAL`] apart (3 s in all).
const LOCK_RETRIES: u32 = 60;
const LOCK_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// The persisted de-dup state of every (gateway, stream, incarnation).
#[derive(Debug)]
pub(crate) struct Dedup {
    db: sled::Db,
    tree: sled::Tree,
    /// Serialises read-modify-write in [`Dedup::mark`].
    write: Mutex<()>,
}

/// gateway ‖ 0x00 ‖ stream code: the prefix of every window of one (gateway, stream).
fn stream_prefix(gw: &GatewayId, stream: Stream) -> Vec<u8> {
    let mut k = Vec::with_capacity(gw.as_str().len() + 10);
    k.extend_from_slice(gw.as_str().as_bytes());
    k.push(0);
    k.push(stream.code());
    k
}

fn key(k: &BatchKey) -> Vec<u8> {
    let mut out = stream_prefix(&k.gateway, k.stream);
    out.extend_from_slice(&k.incarnation.to_be_bytes());
    out
}

impl Dedup {
    /// Opens (or creates) the state at `path`, converting state of the layout before
    /// incarnations. Errors, including corruption, are returned: starting over would accept
    /// replays.
    ///
    /// Blocks, for up to 3 s while a previous instance in this process lets go of the state
    /// (sled releases its lock only after its background writer ends): call it from a
    /// blocking thread.
    pub(crate) fn open(path: &Path) -> Result<Dedup, DedupError> {
        Self::open_waiting(path, |_| std::thread::sleep(LOCK_RETRY_INTERVAL))
    }

    /// [`Dedup::open`], calling `wait(attempt)` before each new attempt while the lock is held.
    fn open_waiting(path: &Path, mut wait: impl FnMut(u32)) -> Result<Dedup, DedupError> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_CAPACITY_BYTES)
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(Some(BACKGROUND_FSYNC_MS));
        // sled releases its lock file only when its last background writer is done, a
        // little after the previous `Db` was dropped: a hub restarted inside one process
        // (tests, `HubProcess`) can race it. Wait for it, briefly; a lock held by another
        // live process stays an error.
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if attempts < LOCK_RETRIES
                        && e.to_string().contains("could not acquire lock") =>
                {
                    attempts += 1;
                    wait(attempts);
                }
                other => break other?,
            }
        };
        let tree = db.open_tree(TREE)?;
        let dedup = Dedup {
            db,
            tree,
            write: Mutex::new(()),
        };
        dedup.convert_legacy()?;
        Ok(dedup)
    }

    /// Moves windows of the layout before incarnations into incarnation 0, then drops the old
    /// tree. Idempotent: a crash before the drop converts the same values again.
    fn convert_legacy(&self) -> Result<(), DedupError> {
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == LEGACY_TREE.as_bytes())
        {
            return Ok(());
        }
        let legacy = self.db.open_tree(LEGACY_TREE)?;
        let mut converted = 0usize;
        for entry in legacy.iter() {
            let (k, v) = entry?;
            let mut window =
                SeqWindow::decode_legacy(&v).map_err(|reason| DedupError::LegacyCorrupt {
                    key: String::from_utf8_lossy(&k).replace('\0', "/"),
                    reason,
                })?;
            window.used_ms = now_ms();
            let mut new_key = k.to_vec();
            new_key.extend_from_slice(&0u64.to_be_bytes());
            self.tree.insert(new_key, window.encode())?;
            converted += 1;
        }
        self.db.flush()?;
        self.db.drop_tree(LEGACY_TREE)?;
        self.db.flush()?;
        tracing::info!(
            windows = converted,
            "converted de-dup state to per-incarnation windows (incarnation 0)"
        );
        Ok(())
    }

    /// The window of one (gateway, stream, incarnation); empty if never seen.
    pub(crate) fn window(&self, k: &BatchKey) -> Result<SeqWindow, DedupError> {
        match self.tree.get(key(k))? {
            None => Ok(SeqWindow::default()),
            Some(v) => SeqWindow::decode(&v).map_err(|reason| DedupError::Corrupt {
                gateway: k.gateway.clone(),
                stream: k.stream,
                incarnation: k.incarnation,
                reason,
            }),
        }
    }

    /// Whether the batch `k` names was seen before.
    pub(crate) fn check(&self, k: &BatchKey) -> Result<Seen, DedupError> {
        Ok(self.window(k)?.check(k.seq))
    }

    /// Records the batch `k` as accepted. Durable at the next [`Dedup::flush`].
    pub(crate) fn mark(&self, k: &BatchKey) -> Result<(), DedupError> {
        self.mark_at(k, now_ms())
    }

    /// [`Dedup::mark`] with the hub clock reading `now` (when the window was last used).
    fn mark_at(&self, k: &BatchKey, now: TimestampMs) -> Result<(), DedupError> {
        let _guard = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let existing = self.tree.get(key(k))?;
        let mut window = self.window(k)?;
        if window.check(k.seq) != Seen::New {
            return Ok(());
        }
        if existing.is_none() {
            self.evict_incarnations(k)?;
        }
        window.mark(k.seq);
        window.used_ms = now;
        self.tree.insert(key(k), window.encode())?;
        Ok(())
    }

    /// Before the first window of a new incarnation: deletes the least recently used windows
    /// of the same (gateway, stream) beyond [`MAX_INCARNATIONS`] − 1.
    fn evict_incarnations(&self, k: &BatchKey) -> Result<(), DedupError> {
        let prefix = stream_prefix(&k.gateway, k.stream);
        let mut used: Vec<(TimestampMs, sled::IVec)> = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, value) = entry?;
            // Keys of another gateway whose id extends this one cannot match: ids hold no 0x00.
            if key.len() != prefix.len() + 8 {
                continue;
            }
            let used_ms = value
                .get(1..9)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(TimestampMs::MIN, i64::from_be_bytes);
            used.push((used_ms, key));
        }
        used.sort();
        let excess = (used.len() + 1).saturating_sub(MAX_INCARNATIONS);
        for (used_ms, key) in used.into_iter().take(excess) {
            let incarnation = key
                .get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            tracing::info!(gateway = %k.gateway, stream = %k.stream, incarnation = format_args!("{incarnation:016x}"), last_used_ms = used_ms, "forgetting the de-dup window of an old store incarnation");
            self.tree.remove(key)?;
        }
        Ok(())
    }

    /// Makes every mark so far durable.
    pub(crate) fn flush(&self) -> Result<(), DedupError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn gw() -> GatewayId {
        GatewayId::new("gw-1").unwrap()
    }

    fn batch(stream: Stream, incarnation: u64, seq: u64) -> BatchKey {
        BatchKey {
            gateway: gw(),
            stream,
            incarnation,
            seq,
        }
    }

    #[test]
    fn reopening_waits_for_the_previous_instance_to_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = Some(Dedup::open(dir.path()).unwrap());
        let mut waits = 0;
        // Opened while `first` still holds the lock; `first` goes away during the first wait.
        let second = Dedup::open_waiting(dir.path(), |_| {
            waits += 1;
            drop(first.take());
            std::thread::sleep(LOCK_RETRY_INTERVAL);
        });
        assert!(waits >= 1, "the first attempt did not find the lock held");
        assert!(second.is_ok(), "{:?}", second.err());
    }

    #[test]
    fn a_lock_that_is_never_released_is_an_error_after_the_retries() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Dedup::open(dir.path()).unwrap();
        let mut waits = 0;
        let err = Dedup::open_waiting(dir.path(), |_| waits += 1).unwrap_err();
        assert_eq!(waits, LOCK_RETRIES);
        assert!(err.to_string().contains("could not acquire lock"), "{err}");
    }

    #[test]
    fn in_order_traffic_keeps_one_run() {
        let mut w = SeqWindow::default();
        for s in 0..100 {
            assert_eq!(w.check(s), Seen::New);
            w.mark(s);
        }
        assert_eq!((w.floor, w.runs.len()), (100, 0));
        assert_eq!(w.check(5), Seen::Duplicate);
    }

    /// Issue 9 item 13: a stream whose first seq is large (as `unix_seconds << 20` was) used
    /// to pile every accepted seq above a floor of 0 and give up after 1,024 batches; from then
    /// on re-sends were `below_window` and a missing batch would have been discarded.
    #[test]
    fn a_large_first_seq_keeps_duplicates_and_late_batches_apart_after_5000_batches() {
        let first = 1_764_500_000u64 << 20;
        let missing = first + 2_500;
        let mut w = SeqWindow::default();
        for s in first..first + 5_000 {
            if s != missing {
                assert_eq!(w.check(s), Seen::New);
                w.mark(s);
            }
        }
        assert_eq!(w.runs.len(), 2, "one gap: two runs");
        assert!(w.encode().len() < 64, "{} bytes", w.encode().len());
        assert!(!w.gave_up);
        assert_eq!(w.check(first + 17), Seen::Duplicate, "a re-send");
        assert_eq!(w.check(first + 4_999), Seen::Duplicate, "a re-send");
        assert_eq!(w.check(missing), Seen::New, "the late batch is written");
        w.mark(missing);
        assert_eq!(w.runs.len(), 1);
        assert_eq!(w.check(missing), Seen::Duplicate);
    }

    /// Issue 9 item 4: a store whose streams began at a clock-derived seq (a clock 30 days
    /// ahead, or a correct one) sent more than a thousand batches and was lost; its
    /// replacement counts from 1 — with a right clock or one stuck in 1970 — and every one of
    /// its batches is new, however the old window looks.
    #[test]
    fn a_replaced_store_is_a_new_incarnation_whatever_the_old_seqs_were() {
        let now_s = 1_764_500_000u64;
        for old_first in [(now_s + 30 * 86_400) << 20, now_s << 20, 1] {
            let dir = tempfile::tempdir().unwrap();
            let d = Dedup::open(dir.path()).unwrap();
            let old = 0x01d_u64;
            for seq in old_first..old_first + 1_100 {
                d.mark(&batch(Stream::Readings, old, seq)).unwrap();
            }
            let new = 0x2e2_u64;
            for seq in 1..=1_100 {
                let k = batch(Stream::Readings, new, seq);
                assert_eq!(
                    d.check(&k).unwrap(),
                    Seen::New,
                    "old first seq {old_first}, seq {seq}"
                );
                d.mark(&k).unwrap();
            }
            assert_eq!(
                d.check(&batch(Stream::Readings, old, old_first + 5))
                    .unwrap(),
                Seen::Duplicate,
                "the old incarnation's re-sends are still recognised"
            );
        }
    }

    #[test]
    fn gaps_hold_until_the_bound_then_the_lowest_is_given_up() {
        let mut w = SeqWindow::default();
        // Every other seq: each accepted seq is a run of its own, each gap stays open.
        for i in 0..MAX_RUNS as u64 {
            w.mark(10 + 2 * i);
        }
        assert_eq!((w.floor, w.runs.len()), (0, MAX_RUNS));
        assert_eq!(w.check(11), Seen::New, "the gap is still open");
        w.mark(10 + 2 * MAX_RUNS as u64);
        assert_eq!(w.runs.len(), MAX_RUNS);
        assert_eq!(w.floor, 11, "given up: everything up to the lowest run");
        assert!(w.gave_up);
        assert_eq!(w.check(3), Seen::BelowWindow);
        assert_eq!(w.check(10), Seen::BelowWindow);
        assert_eq!(w.check(13), Seen::New, "higher gaps stay open");
    }

    #[test]
    fn u64_max_is_a_seq_like_any_other() {
        let mut w = SeqWindow {
            floor: u64::MAX - 1,
            ..SeqWindow::default()
        };
        w.mark(u64::MAX);
        assert_eq!(w.check(u64::MAX), Seen::Duplicate);
        assert_eq!(w.check(u64::MAX - 1), Seen::New);
        w.mark(u64::MAX - 1);
        assert_eq!(w.check(u64::MAX - 1), Seen::Duplicate);
        assert_eq!(SeqWindow::decode(&w.encode()).unwrap(), w);
    }

    #[test]
    fn state_survives_reopen_only_after_flush_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = Dedup::open(dir.path()).unwrap();
            assert_eq!(d.check(&batch(Stream::Alarms, 9, 7)).unwrap(), Seen::New);
            d.mark(&batch(Stream::Alarms, 9, 7)).unwrap();
            d.flush().unwrap();
        }
        let d = Dedup::open(dir.path()).unwrap();
        assert_eq!(
            d.check(&batch(Stream::Alarms, 9, 7)).unwrap(),
            Seen::Duplicate
        );
        assert_eq!(d.check(&batch(Stream::Readings, 9, 7)).unwrap(), Seen::New);
        assert_eq!(
            d.check(&batch(Stream::Alarms, 10, 7)).unwrap(),
            Seen::New,
            "another incarnation's seq 7 is another batch"
        );
        d.tree
            .insert(key(&batch(Stream::Audit, 9, 0)), &[0u8; 5])
            .unwrap();
        let err = d.check(&batch(Stream::Audit, 9, 1)).unwrap_err();
        assert!(matches!(err, DedupError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn windows_of_old_incarnations_are_bounded_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dedup::open(dir.path()).unwrap();
        let mut clock = 1_000;
        let mut mark = |k: BatchKey| {
            clock += 1;
            d.mark_at(&k, clock).unwrap();
        };
        for inc in 0..MAX_INCARNATIONS as u64 {
            mark(batch(Stream::Readings, inc, 1));
        }
        // Incarnation 0 is used again, so 1 is now the least recently used.
        mark(batch(Stream::Readings, 0, 2));
        let other_stream = batch(Stream::Alarms, 1, 1);
        mark(other_stream.clone());
        mark(batch(Stream::Readings, 100, 1));
        let kept = |inc| d.check(&batch(Stream::Readings, inc, 1)).unwrap() == Seen::Duplicate;
        assert!(!kept(1), "the least recently used window was forgotten");
        assert!(kept(0) && kept(2) && kept(100));
        assert_eq!(
            d.tree
                .scan_prefix(stream_prefix(&gw(), Stream::Readings))
                .count(),
            MAX_INCARNATIONS
        );
        assert_eq!(
            d.check(&other_stream).unwrap(),
            Seen::Duplicate,
            "other streams untouched"
        );
    }

    #[test]
    fn state_of_the_layout_before_incarnations_becomes_incarnation_zero() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let legacy = db.open_tree(LEGACY_TREE).unwrap();
            let mut k = gw().as_str().as_bytes().to_vec();
            k.extend([0, Stream::Readings.code()]);
            // gave_up 0, floor 40, accepted 42 and 43.
            let mut v = vec![0u8];
            for s in [40u64, 42, 43] {
                v.extend_from_slice(&s.to_be_bytes());
            }
            legacy.insert(k, v).unwrap();
            db.flush().unwrap();
        }
        let d = Dedup::open(dir.path()).unwrap();
        let seen = |seq| d.check(&batch(Stream::Readings, 0, seq)).unwrap();
        assert_eq!(
            [seen(39), seen(40), seen(41), seen(42), seen(43), seen(44)],
            [
                Seen::Duplicate,
                Seen::New,
                Seen::New,
                Seen::Duplicate,
                Seen::Duplicate,
                Seen::New
            ]
        );
        assert!(!d
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == LEGACY_TREE.as_bytes()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Against a model that remembers everything: never New for an accepted seq, and New
        /// for every unaccepted seq not below a given-up floor.
        #[test]
        fn window_matches_a_full_set(seqs in proptest::collection::vec(0u64..6000, 0..4000)) {
            let mut w = SeqWindow::default();
            let mut all = BTreeSet::new();
            for s in seqs {
                let seen = w.check(s);
                if all.contains(&s) {
                    prop_assert_ne!(seen, Seen::New);
                } else if seen != Seen::New {
                    prop_assert!(s < w.floor && w.gave_up);
                }
                if seen == Seen::New {
                    w.mark(s);
                    all.insert(s);
                }
                prop_assert!(w.runs.len() <= MAX_RUNS);
            }
            prop_assert_eq!(SeqWindow::decode(&w.encode()).unwrap(), w);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = SeqWindow::decode(&bytes);
            let _ = SeqWindow::decode_legacy(&bytes);
        }
    }
}

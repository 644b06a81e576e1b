//! Persisted de-duplication of batches on (gateway, stream, seq), in sled.
//!
//! Gateways send each stream in sequence order, but re-send unacknowledged batches after a
//! timeout and after every reconnect, and their outbox may drop batches under its quota (leaving
//! gaps that never fill). Per (gateway, stream) the hub keeps the accepted sequence numbers as a
//! [`SeqWindow`]:
//!
//! - `floor`: every seq **below** it counts as accepted;
//! - `above`: the accepted seqs at or above `floor`, sorted, at most [`MAX_ABOVE_FLOOR`].
//!
//! Marking a seq inserts it into `above`, then moves `floor` up through any contiguous run
//! (in-order traffic therefore keeps `above` empty). A gap (a batch lost at the gateway, or one
//! still to come) holds `floor` back; when `above` would exceed [`MAX_ABOVE_FLOOR`] entries the
//! oldest gap is given up: `floor` jumps to the smallest accepted seq and the run above it is
//! absorbed. Once a gap was given up, a seq below `floor` may be either; it is reported
//! [`Seen::BelowWindow`] (before that, [`Seen::Duplicate`]). Either way the hub acknowledges it without writing it (a duplicate can then not
//! occur, at the price of dropping a batch that arrives more than 1024 accepted batches late,
//! which in-order sending with a bounded in-flight window never does). So the state of one
//! (gateway, stream) is at most 8 + 8 × 1024 bytes.
//!
//! # Layout
//!
//! Tree `dedup`; key = gateway id bytes ‖ 0x00 ‖ stream code (gateway ids never contain 0x00);
//! value = `gave_up` u8 (1 once a gap was given up, else 0) ‖ `floor` u64 big-endian ‖ each
//! `above` seq u64 big-endian, ascending. A value that does not have this shape (flag 0 or 1,
//! then a multiple of 8 bytes, seqs strictly ascending and `>= floor`, at most the bound) is
//! [`DedupError::Corrupt`]: guessing could accept a replay, so the batch is refused (not acked)
//! and an operator decides.
//!
//! # Durability
//!
//! [`Dedup::mark`] is staged; it is durable once [`Dedup::flush`] returns (sled's flush: survives
//! a process crash; sled's background `sync_all` every second bounds what power loss can take).
//! sled's page cache is capped at [`CACHE_CAPACITY_BYTES`]. All calls block: the hub makes them
//! on blocking threads ([`HubProcess`](super::HubProcess) opens the state in `spawn_blocking`,
//! and `service` ingests there), never on an async worker.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use crate::reading::{GatewayId, Stream};

/// Most accepted seqs kept above the floor per (gateway, stream).
pub(crate) const MAX_ABOVE_FLOOR: usize = 1024;
/// sled page cache of the de-dup state.
pub(crate) const CACHE_CAPACITY_BYTES: u64 = 8 * 1024 * 1024;
const BACKGROUND_FSYNC_MS: u64 = 1000;
const TREE: &str = "dedup";

/// Whether a batch was seen before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    New,
    /// Accepted before.
    Duplicate,
    /// Below the floor but never recorded as accepted: a gap the window gave up on.
    BelowWindow,
}

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("de-dup state: {0}")]
    Sled(#[from] sled::Error),
    #[error("de-dup state of {gateway}/{stream} is corrupt: {reason}")]
    Corrupt {
        gateway: GatewayId,
        stream: Stream,
        reason: String,
    },
}

/// The accepted seqs of one (gateway, stream). See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SeqWindow {
    pub floor: u64,
    pub above: BTreeSet<u64>,
    /// Whether a gap was ever given up: then a seq below `floor` may never have been accepted,
    /// and [`SeqWindow::check`] says [`Seen::BelowWindow`] instead of [`Seen::Duplicate`].
    pub gave_up: bool,
}

impl SeqWindow {
    /// Whether `seq` was accepted (or lies below the floor).
    pub(crate) fn check(&self, seq: u64) -> Seen {
        if self.above.contains(&seq) {
            Seen::Duplicate
        } else if seq < self.floor {
            if self.gave_up {
                Seen::BelowWindow
            } else {
                Seen::Duplicate
            }
        } else {
            Seen::New
        }
    }

    /// Records `seq` as accepted and compacts.
    pub(crate) fn mark(&mut self, seq: u64) {
        if seq < self.floor {
            return;
        }
        self.above.insert(seq);
        self.compact();
        while self.above.len() > MAX_ABOVE_FLOOR {
            if let Some(lowest) = self.above.first().copied() {
                self.floor = lowest;
                self.gave_up = true;
                self.compact();
            }
        }
    }

    fn compact(&mut self) {
        while self.floor < u64::MAX && self.above.remove(&self.floor) {
            self.floor += 1;
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + 8 * self.above.len());
        out.push(u8::from(self.gave_up));
        out.extend_from_slice(&self.floor.to_be_bytes());
        for s in &self.above {
            out.extend_from_slice(&s.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<SeqWindow, String> {
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
        let mut above = BTreeSet::new();
        let mut last = None;
        for s in seqs {
            if s < floor || last.is_some_and(|l| s <= l) {
                return Err(format!("seq {s} out of order (floor {floor})"));
            }
            above.insert(s);
            last = Some(s);
        }
        if above.len() > MAX_ABOVE_FLOOR {
            return Err(format!("{} seqs above the floor", above.len()));
        }
        Ok(SeqWindow {
            floor,
            above,
            gave_up: *flag == 1,
        })
    }
}

/// Attempts to take sled's lock while a previous instance in this process finishes its
/// background writes, [`LOCK_RETRY_INTERVAL`] apart (3 s in all).
const LOCK_RETRIES: u32 = 60;
const LOCK_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// The persisted de-dup state of every (gateway, stream).
#[derive(Debug)]
pub(crate) struct Dedup {
    db: sled::Db,
    tree: sled::Tree,
    /// Serialises read-modify-write in [`Dedup::mark`].
    write: Mutex<()>,
}

fn key(gw: &GatewayId, stream: Stream) -> Vec<u8> {
    let mut k = Vec::with_capacity(gw.as_str().len() + 2);
    k.extend_from_slice(gw.as_str().as_bytes());
    k.push(0);
    k.push(stream.code());
    k
}

impl Dedup {
    /// Opens (or creates) the state at `path`. Errors, including corruption, are returned:
    /// starting over would accept replays.
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
        Ok(Dedup {
            db,
            tree,
            write: Mutex::new(()),
        })
    }

    /// The window of one (gateway, stream); empty if never seen.
    pub(crate) fn window(&self, gw: &GatewayId, stream: Stream) -> Result<SeqWindow, DedupError> {
        match self.tree.get(key(gw, stream))? {
            None => Ok(SeqWindow::default()),
            Some(v) => SeqWindow::decode(&v).map_err(|reason| DedupError::Corrupt {
                gateway: gw.clone(),
                stream,
                reason,
            }),
        }
    }

    pub(crate) fn check(
        &self,
        gw: &GatewayId,
        stream: Stream,
        seq: u64,
    ) -> Result<Seen, DedupError> {
        Ok(self.window(gw, stream)?.check(seq))
    }

    /// Records (gateway, stream, seq) as accepted. Durable at the next [`Dedup::flush`].
    pub(crate) fn mark(&self, gw: &GatewayId, stream: Stream, seq: u64) -> Result<(), DedupError> {
        let _guard = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut window = self.window(gw, stream)?;
        if window.check(seq) != Seen::New {
            return Ok(());
        }
        window.mark(seq);
        self.tree.insert(key(gw, stream), window.encode())?;
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

    fn gw() -> GatewayId {
        GatewayId::new("gw-1").unwrap()
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
    fn in_order_traffic_keeps_nothing_above_the_floor() {
        let mut w = SeqWindow::default();
        for s in 0..100 {
            assert_eq!(w.check(s), Seen::New);
            w.mark(s);
        }
        assert_eq!((w.floor, w.above.len()), (100, 0));
        assert_eq!(w.check(5), Seen::Duplicate);
    }

    #[test]
    fn a_gap_holds_the_floor_until_the_bound_then_is_given_up() {
        let mut w = SeqWindow::default();
        w.mark(0);
        // seq 1 never arrives.
        for s in 2..(2 + MAX_ABOVE_FLOOR as u64) {
            w.mark(s);
        }
        assert_eq!(w.floor, 1);
        assert_eq!(w.above.len(), MAX_ABOVE_FLOOR);
        assert_eq!(w.check(1), Seen::New, "the gap is still open");
        w.mark(2 + MAX_ABOVE_FLOOR as u64);
        assert_eq!((w.floor, w.above.len()), (3 + MAX_ABOVE_FLOOR as u64, 0));
        assert_eq!(w.check(1), Seen::BelowWindow);
        assert_eq!(w.check(2), Seen::BelowWindow);
    }

    #[test]
    fn u64_max_is_kept_above_the_floor() {
        let mut w = SeqWindow {
            floor: u64::MAX - 1,
            ..SeqWindow::default()
        };
        w.mark(u64::MAX - 1);
        w.mark(u64::MAX);
        assert_eq!(w.check(u64::MAX), Seen::Duplicate);
        assert_eq!(SeqWindow::decode(&w.encode()).unwrap(), w);
    }

    #[test]
    fn state_survives_reopen_only_after_flush_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = Dedup::open(dir.path()).unwrap();
            assert_eq!(d.check(&gw(), Stream::Alarms, 7).unwrap(), Seen::New);
            d.mark(&gw(), Stream::Alarms, 7).unwrap();
            d.flush().unwrap();
        }
        let d = Dedup::open(dir.path()).unwrap();
        assert_eq!(d.check(&gw(), Stream::Alarms, 7).unwrap(), Seen::Duplicate);
        assert_eq!(d.check(&gw(), Stream::Readings, 7).unwrap(), Seen::New);
        d.tree.insert(key(&gw(), Stream::Audit), &[0u8; 5]).unwrap();
        let err = d.check(&gw(), Stream::Audit, 1).unwrap_err();
        assert!(matches!(err, DedupError::Corrupt { .. }), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Against a model that remembers everything: never New for an accepted seq, and New
        /// for every unaccepted seq not below a given-up floor.
        #[test]
        fn window_matches_a_full_set(seqs in proptest::collection::vec(0u64..3000, 0..2500)) {
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
                prop_assert!(w.above.len() <= MAX_ABOVE_FLOOR);
            }
            prop_assert_eq!(SeqWindow::decode(&w.encode()).unwrap(), w);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = SeqWindow::decode(&bytes);
        }
    }
}

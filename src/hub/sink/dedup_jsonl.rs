//! [`JsonlDedupSink`]: the JSON Lines file plus the local de-dup window, as one [`Sink`].
//!
//! A group is committed in this order, under one lock (two copies of a batch arriving at once
//! are written once):
//!
//! 1. check each batch against the sled window ([`Dedup`]): seen before → `Duplicate` (or
//!    `BelowWindow`), nothing written;
//! 2. write the new batches' lines with one sync ([`JsonlSink::write_batches`]);
//! 3. mark them seen and flush the window once.
//!
//! Crash consistency: the file is written before the batches are marked, and
//! [`JsonlDedupSink::open`] asks the file for batches it holds that the window does not know
//! (a crash between steps 2 and 3) and marks them first; `jsonl.rs` documents exactly what
//! that covers. A failure in step 2 or 3 fails the whole group: nothing is acknowledged, the
//! gateways re-send, and the window (not marked, or marked but not flushed) answers the
//! re-sends as it must.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use super::{BatchKey, JsonlSink, Outcome, Sink, SinkBatch, SinkError};
use crate::hub::config::Rotation;
use crate::hub::dedup::{Dedup, Seen};

/// JSON Lines with a local de-dup window. See the module docs.
#[derive(Debug)]
pub(crate) struct JsonlDedupSink {
    file: JsonlSink,
    dedup: Dedup,
    /// Serialises check → write → mark.
    commit: Mutex<()>,
    recovered: u64,
}

impl JsonlDedupSink {
    /// Opens the window in `state` and the file at `path`, and marks the batches the file
    /// holds but the window missed. Blocks (sled, file reads and syncs, up to 3 s waiting for
    /// a previous instance's lock).
    pub(crate) fn open(
        state: &Path,
        path: &Path,
        rotate: Rotation,
    ) -> Result<JsonlDedupSink, SinkError> {
        let dedup = Dedup::open(state)?;
        let file = JsonlSink::open(path)?.with_rotation(rotate);
        JsonlDedupSink::new(dedup, file)
    }

    /// Wraps an open window and file and runs the recovery.
    pub(crate) fn new(dedup: Dedup, file: JsonlSink) -> Result<JsonlDedupSink, SinkError> {
        let is_marked = |k: &BatchKey| {
            // An unreadable state counts as marked: recovery then cuts nothing it cannot judge.
            dedup.check(k).map_or(true, |s| s != Seen::New)
        };
        let recovered = file.recover(&is_marked)?;
        for k in &recovered {
            tracing::warn!(gateway = %k.gateway, stream = %k.stream, incarnation = format_args!("{:016x}", k.incarnation), seq = k.seq, "marking a batch the sink holds but de-dup missed");
            dedup.mark(k)?;
        }
        dedup.flush()?;
        Ok(JsonlDedupSink {
            file,
            dedup,
            commit: Mutex::new(()),
            recovered: recovered.len() as u64,
        })
    }
}

impl Sink for JsonlDedupSink {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    fn commit(&self, batches: &[SinkBatch<'_>]) -> Result<Vec<Outcome>, SinkError> {
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::with_capacity(batches.len());
        let mut fresh = Vec::new();
        for b in batches {
            out.push(match self.dedup.check(b.key)? {
                Seen::New => {
                    fresh.push(*b);
                    Outcome::Written
                }
                Seen::Duplicate => Outcome::Duplicate,
                Seen::BelowWindow => Outcome::BelowWindow,
            });
        }
        if !fresh.is_empty() {
            self.file.write_batches(&fresh)?;
            for b in &fresh {
                self.dedup.mark(b.key)?;
            }
            self.dedup.flush()?;
        }
        Ok(out)
    }

    fn recovered(&self) -> u64 {
        self.recovered
    }

    fn reopen(&self) -> Result<(), SinkError> {
        self.file.reopen()
    }
}

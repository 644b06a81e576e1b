//! In-memory accounting and the quota policy, shared by every [`Store`](super::Store)
//! implementation so they cannot drift apart.
//!
//! A [`Ledger`] knows, per stream, how many batches and bytes are stored, how many were
//! evicted, and the next sequence number. It decides whether an append is allowed and which
//! batches it evicts; the backend supplies the oldest batches of a stream and performs the
//! writes. Backends apply a change to a copy of the ledger, persist it, and only then replace
//! the ledger, so a failed write leaves the accounting untouched.

use crate::reading::Stream;

use super::keys::MetaField;
use super::{StoreError, StoreStats, StreamStats};

/// A batch chosen for eviction: (stream, seq, bytes), as in [`super::AppendOutcome`].
pub(crate) type Eviction = (Stream, u64, u64);

/// The order in which streams give up batches when the quota is reached: the purpose flows
/// (in code order), then alarms, then audit.
const EVICTION_ORDER: [Stream; Stream::COUNT] = {
    let mut order = [Stream::Readings; Stream::COUNT];
    let mut i = 0;
    let mut at = 0;
    while i < Stream::COUNT {
        if i != 1 && i != 2 {
            order[at] = Stream::ALL[i];
            at += 1;
        }
        i += 1;
    }
    order[at] = Stream::Alarms;
    order[at + 1] = Stream::Audit;
    order
};

#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    stats: StoreStats,
    next_seq: [u64; Stream::COUNT],
}

/// Sequence numbers and counters at or above this are absurd (2^62: more than a million
/// batches a second for 100,000 years): a store holding them is treated as corrupt.
pub(crate) const SANE_LIMIT: u64 = 1 << 62;

fn idx(stream: Stream) -> usize {
    stream.index()
}

impl Ledger {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            stats: StoreStats {
                max_bytes,
                ..StoreStats::default()
            },
            next_seq: [1; Stream::COUNT],
        }
    }

    /// Batches stored, acknowledged, evicted or purged, ever: never goes down (see
    /// `manifest.rs`).
    pub(crate) fn accounted(&self, stream: Stream) -> u64 {
        let st = self.stream(stream);
        st.batches
            .saturating_add(st.evicted_batches)
            .saturating_add(st.acked_batches)
            .saturating_add(st.purged_batches)
    }

    /// The first persisted value that is absurd, if any: (what, stream, value).
    pub(crate) fn absurd(&self) -> Option<(&'static str, Stream, u64)> {
        Stream::ALL.into_iter().find_map(|s| {
            [
                ("next_seq", self.next_seq(s)),
                ("evicted_batches", self.stream(s).evicted_batches),
                ("evicted_bytes", self.stream(s).evicted_bytes),
                ("acked_batches", self.stream(s).acked_batches),
                ("purged_batches", self.stream(s).purged_batches),
            ]
            .into_iter()
            .find(|(_, v)| *v >= SANE_LIMIT)
            .map(|(what, v)| (what, s, v))
        })
    }

    pub(crate) fn stats(&self) -> &StoreStats {
        &self.stats
    }

    pub(crate) fn stream(&self, stream: Stream) -> &StreamStats {
        self.stats.get(stream)
    }

    pub(crate) fn next_seq(&self, stream: Stream) -> u64 {
        self.next_seq[idx(stream)]
    }

    /// Counts a batch found on disk at open.
    pub(crate) fn count_stored(&mut self, stream: Stream, seq: u64, len: u64) {
        let s = self.stats.get_mut(stream);
        s.batches += 1;
        s.bytes += len;
        self.raise_next_seq(stream, seq.saturating_add(1));
    }

    fn raise_next_seq(&mut self, stream: Stream, next: u64) {
        let n = &mut self.next_seq[idx(stream)];
        *n = (*n).max(next);
    }

    /// A persisted per-stream counter, as it must be written to metadata.
    pub(crate) fn meta(&self, field: MetaField, stream: Stream) -> u64 {
        match field {
            MetaField::NextSeq => self.next_seq(stream),
            MetaField::EvictedBatches => self.stream(stream).evicted_batches,
            MetaField::EvictedBytes => self.stream(stream).evicted_bytes,
            MetaField::AckedBatches => self.stream(stream).acked_batches,
            MetaField::PurgedBatches => self.stream(stream).purged_batches,
        }
    }

    /// Restores a persisted counter at open. The sequence high-water mark is only ever
    /// raised, whether by metadata or by a batch found on disk.
    pub(crate) fn restore_meta(&mut self, field: MetaField, stream: Stream, value: u64) {
        match field {
            MetaField::NextSeq => self.raise_next_seq(stream, value),
            MetaField::EvictedBatches => self.stats.get_mut(stream).evicted_batches = value,
            MetaField::EvictedBytes => self.stats.get_mut(stream).evicted_bytes = value,
            MetaField::AckedBatches => self.stats.get_mut(stream).acked_batches = value,
            MetaField::PurgedBatches => self.stats.get_mut(stream).purged_batches = value,
        }
    }

    /// Checks an append without changing anything.
    pub(crate) fn check_append(
        &self,
        stream: Stream,
        seq: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let next = self.next_seq(stream);
        if seq < next {
            return Err(StoreError::SeqRegression { stream, seq, next });
        }
        if seq == u64::MAX {
            return Err(StoreError::SeqExhausted { stream });
        }
        if len > self.stats.max_bytes {
            return Err(StoreError::TooLarge {
                bytes: len,
                max_bytes: self.stats.max_bytes,
            });
        }
        Ok(())
    }

    /// Chooses the batches to evict so that `len` more bytes fit, oldest first in
    /// [`EVICTION_ORDER`]. `oldest(stream)` yields `(seq, bytes)` of a stream's batches in
    /// ascending seq order. Call only after [`Ledger::check_append`] succeeded.
    pub(crate) fn plan_evictions<I>(
        &self,
        len: u64,
        mut oldest: impl FnMut(Stream) -> I,
    ) -> Result<Vec<Eviction>, StoreError>
    where
        I: Iterator<Item = Result<(u64, u64), StoreError>>,
    {
        let mut to_free = (self.stats.total_bytes() + len).saturating_sub(self.stats.max_bytes);
        let mut evicted = Vec::new();
        for stream in EVICTION_ORDER {
            if to_free == 0 {
                break;
            }
            for item in oldest(stream) {
                let (seq, bytes) = item?;
                evicted.push((stream, seq, bytes));
                to_free = to_free.saturating_sub(bytes);
                if to_free == 0 {
                    break;
                }
            }
        }
        if to_free > 0 {
            return Err(StoreError::Corrupt(format!(
                "quota accounting disagrees with the stored batches: {to_free} bytes over quota \
                 after evicting every batch"
            )));
        }
        Ok(evicted)
    }

    /// Records an append and the evictions it caused. A counter that would overflow means
    /// the persisted state is absurd ([`StoreError::Corrupt`]); nothing is changed then.
    pub(crate) fn record_append(
        &mut self,
        stream: Stream,
        seq: u64,
        len: u64,
        evicted: &[Eviction],
    ) -> Result<(), StoreError> {
        let overflow = |what: &str, s: Stream| {
            StoreError::Corrupt(format!("{what} of stream {s} would overflow"))
        };
        let mut next = self.clone();
        for &(s, _, bytes) in evicted {
            let st = next.stats.get_mut(s);
            st.batches = st.batches.saturating_sub(1);
            st.bytes = st.bytes.saturating_sub(bytes);
            st.evicted_batches = st
                .evicted_batches
                .checked_add(1)
                .ok_or_else(|| overflow("evicted_batches", s))?;
            st.evicted_bytes = st
                .evicted_bytes
                .checked_add(bytes)
                .ok_or_else(|| overflow("evicted_bytes", s))?;
        }
        let st = next.stats.get_mut(stream);
        st.batches = st
            .batches
            .checked_add(1)
            .ok_or_else(|| overflow("batches", stream))?;
        st.bytes = st
            .bytes
            .checked_add(len)
            .ok_or_else(|| overflow("bytes", stream))?;
        let after = seq
            .checked_add(1)
            .ok_or(StoreError::SeqExhausted { stream })?;
        next.raise_next_seq(stream, after);
        *self = next;
        Ok(())
    }

    /// Records the deletion of an acknowledged batch.
    pub(crate) fn record_ack(&mut self, stream: Stream, len: u64) {
        let st = self.stats.get_mut(stream);
        st.batches = st.batches.saturating_sub(1);
        st.bytes = st.bytes.saturating_sub(len);
        st.acked_batches = st.acked_batches.saturating_add(1);
    }

    /// Records the destruction of every batch of `stream` ([`super::Store::purge`]).
    pub(crate) fn record_purge(&mut self, stream: Stream) -> super::Purged {
        let st = self.stats.get_mut(stream);
        let purged = super::Purged {
            batches: st.batches,
            bytes: st.bytes,
        };
        st.purged_batches = st.purged_batches.saturating_add(st.batches);
        st.batches = 0;
        st.bytes = 0;
        purged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: &[(u64, u64)]) -> impl Iterator<Item = Result<(u64, u64), StoreError>> + '_ {
        v.iter().map(|&x| Ok(x))
    }

    #[test]
    fn check_append_rejects_regression_exhaustion_and_oversize() {
        let mut l = Ledger::new(100);
        assert!(l.check_append(Stream::Readings, 1, 100).is_ok());
        assert!(matches!(
            l.check_append(Stream::Readings, 0, 1),
            Err(StoreError::SeqRegression {
                seq: 0,
                next: 1,
                ..
            })
        ));
        assert!(matches!(
            l.check_append(Stream::Alarms, 1, 101),
            Err(StoreError::TooLarge {
                bytes: 101,
                max_bytes: 100
            })
        ));
        l.record_append(Stream::Audit, u64::MAX - 1, 1, &[])
            .unwrap();
        assert_eq!(l.next_seq(Stream::Audit), u64::MAX);
        assert!(matches!(
            l.check_append(Stream::Audit, u64::MAX, 1),
            Err(StoreError::SeqExhausted { .. })
        ));
    }

    #[test]
    fn evicts_readings_then_alarms_then_audit_only_as_much_as_needed() {
        let mut l = Ledger::new(100);
        l.record_append(Stream::Readings, 1, 30, &[]).unwrap();
        l.record_append(Stream::Alarms, 1, 30, &[]).unwrap();
        l.record_append(Stream::Audit, 1, 30, &[]).unwrap();
        let plan = l
            .plan_evictions(50, |s| match s {
                Stream::Readings => ok(&[(1, 30)]),
                Stream::Alarms => ok(&[(1, 30)]),
                Stream::Audit => ok(&[(1, 30)]),
                _ => ok(&[]),
            })
            .unwrap();
        assert_eq!(
            plan,
            vec![(Stream::Readings, 1, 30), (Stream::Alarms, 1, 30)]
        );
        l.record_append(Stream::Readings, 2, 50, &plan).unwrap();
        assert_eq!(l.stats().total_bytes(), 80);
        assert_eq!(l.stream(Stream::Alarms).evicted_bytes, 30);
        assert_eq!(l.stream(Stream::Readings).evicted_batches, 1);
        assert_eq!(l.stream(Stream::Readings).batches, 1);
    }

    #[test]
    fn accounting_that_disagrees_with_storage_is_an_error_not_a_panic() {
        let mut l = Ledger::new(10);
        l.record_append(Stream::Readings, 1, 10, &[]).unwrap();
        let err = l.plan_evictions(5, |_| ok(&[])).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)));
    }
}

//! Model test: random append/ack/flush/reopen/peek sequences run against [`SledStore`],
//! [`MemStore`] and a plain `BTreeMap` model written independently of the ledger; results,
//! peeks, `next_seq` and stats must agree after every operation.
//!
//! The model evicts with `BTreeMap::pop_first`, which is the policy by construction: keys are
//! `(priority, Stream, seq)`, so the purpose flows (not priority, in code order) go before
//! alarms < audit.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;

use crate::reading::Stream;

use super::super::{MemStore, SledStore, Store, StoreError, StoreOptions, StoreStats, StoredBatch};

const MAX_BYTES: u64 = 2000;

#[derive(Debug, Clone)]
enum Op {
    /// `delta` is added to next_seq: -1 is a regression, > 0 skips numbers.
    Append {
        stream: Stream,
        delta: i8,
        len: usize,
        fill: u8,
    },
    /// Acks one of the stream's stored seqs, or next_seq (never stored).
    Ack {
        stream: Stream,
        pick: Index,
    },
    /// Destroys every batch of the stream (the end of an emergency collection).
    Purge {
        stream: Stream,
    },
    Flush,
    Reopen,
    Peek {
        stream: Stream,
        from: u64,
        max: usize,
    },
}

fn stream() -> impl Strategy<Value = Stream> {
    prop::sample::select(Stream::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (stream(), -1i8..=2, prop_oneof![9 => 0usize..700, 1 => Just(2001usize)], any::<u8>())
            .prop_map(|(stream, delta, len, fill)| Op::Append { stream, delta, len, fill }),
        3 => (stream(), any::<Index>()).prop_map(|(stream, pick)| Op::Ack { stream, pick }),
        1 => stream().prop_map(|stream| Op::Purge { stream }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        2 => (stream(), 0u64..12, 0usize..5).prop_map(|(stream, from, max)| Op::Peek { stream, from, max }),
    ]
}

/// What an operation returned, comparable across implementations.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Appended(Vec<(Stream, u64, u64)>),
    Refused(&'static str),
    Acked(bool),
    Purged(super::super::Purged),
    Peeked(Vec<StoredBatch>),
    Done,
}

fn refusal(e: &StoreError) -> &'static str {
    match e {
        StoreError::SeqRegression { .. } => "seq_regression",
        StoreError::SeqExhausted { .. } => "seq_exhausted",
        StoreError::TooLarge { .. } => "too_large",
        other => panic!("unexpected store error: {other}"),
    }
}

#[derive(Debug, Default)]
struct Model {
    batches: BTreeMap<(bool, Stream, u64), Vec<u8>>,
    next_seq: BTreeMap<Stream, u64>,
    evicted: BTreeMap<Stream, (u64, u64)>,
    acked: BTreeMap<Stream, u64>,
    purged: BTreeMap<Stream, u64>,
}

impl Model {
    fn next_seq(&self, stream: Stream) -> u64 {
        self.next_seq.get(&stream).copied().unwrap_or(1)
    }

    fn bytes(&self) -> u64 {
        self.batches.values().map(|v| v.len() as u64).sum()
    }

    fn append(&mut self, stream: Stream, seq: u64, bytes: &[u8]) -> Outcome {
        if seq < self.next_seq(stream) {
            return Outcome::Refused("seq_regression");
        }
        if bytes.len() as u64 > MAX_BYTES {
            return Outcome::Refused("too_large");
        }
        let mut evicted = Vec::new();
        while self.bytes() + bytes.len() as u64 > MAX_BYTES {
            let ((_, s, q), v) = self.batches.pop_first().unwrap();
            let e = self.evicted.entry(s).or_default();
            e.0 += 1;
            e.1 += v.len() as u64;
            evicted.push((s, q, v.len() as u64));
        }
        self.batches
            .insert((stream.is_priority(), stream, seq), bytes.to_vec());
        self.next_seq.insert(stream, seq + 1);
        Outcome::Appended(evicted)
    }

    fn stored_seqs(&self, stream: Stream) -> Vec<u64> {
        self.batches
            .range((stream.is_priority(), stream, 0)..=(stream.is_priority(), stream, u64::MAX))
            .map(|(k, _)| k.2)
            .collect()
    }

    fn peek(&self, stream: Stream, from: u64, max: usize) -> Vec<StoredBatch> {
        self.batches
            .range((stream.is_priority(), stream, from)..=(stream.is_priority(), stream, u64::MAX))
            .take(max)
            .map(|(&(_, stream, seq), v)| StoredBatch {
                stream,
                seq,
                bytes: v.clone(),
            })
            .collect()
    }

    fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            max_bytes: MAX_BYTES,
            ..StoreStats::default()
        };
        for s in Stream::ALL {
            let st = stats.get_mut(s);
            for q in self.stored_seqs(s) {
                st.batches += 1;
                st.bytes += self.batches[&(s.is_priority(), s, q)].len() as u64;
            }
            (st.evicted_batches, st.evicted_bytes) =
                self.evicted.get(&s).copied().unwrap_or_default();
            st.acked_batches = self.acked.get(&s).copied().unwrap_or_default();
            st.purged_batches = self.purged.get(&s).copied().unwrap_or_default();
        }
        stats
    }
}

fn apply(store: &dyn Store, op: &Op, seq: u64, bytes: &[u8]) -> Outcome {
    match op {
        Op::Append { stream, .. } => match store.append(*stream, seq, bytes) {
            Ok(out) => Outcome::Appended(out.evicted),
            Err(e) => Outcome::Refused(refusal(&e)),
        },
        Op::Ack { stream, .. } => Outcome::Acked(store.ack(*stream, seq).unwrap()),
        Op::Purge { stream } => Outcome::Purged(store.purge(*stream).unwrap()),
        Op::Flush => {
            store.flush().unwrap();
            Outcome::Done
        }
        // The reopen itself happens in `run`, without a flush: dropping must not lose data.
        Op::Reopen => Outcome::Done,
        Op::Peek { stream, from, max } => {
            Outcome::Peeked(store.peek(*stream, *from, *max).unwrap())
        }
    }
}

fn open(path: &Path) -> SledStore {
    let opts = StoreOptions {
        max_bytes: MAX_BYTES,
        cache_capacity_bytes: 1 << 20,
    };
    super::reopen(path, opts)
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let mut sled = open(&path);
    let mem = MemStore::new(MAX_BYTES);
    let mut model = Model::default();

    for op in ops {
        // Resolve the op's seq and bytes from the model, so all three see the same call.
        let (seq, bytes) = match op {
            Op::Append {
                stream,
                delta,
                len,
                fill,
            } => {
                let seq = model
                    .next_seq(*stream)
                    .saturating_add_signed(i64::from(*delta));
                (
                    seq,
                    (0..*len).map(|i| (i as u8).wrapping_add(*fill)).collect(),
                )
            }
            Op::Ack { stream, pick } => {
                let mut candidates = model.stored_seqs(*stream);
                candidates.push(model.next_seq(*stream));
                (*pick.get(&candidates), Vec::new())
            }
            _ => (0, Vec::new()),
        };
        let expected = match op {
            Op::Append { stream, .. } => model.append(*stream, seq, &bytes),
            Op::Ack { stream, .. } => {
                let found = model
                    .batches
                    .remove(&(stream.is_priority(), *stream, seq))
                    .is_some();
                *model.acked.entry(*stream).or_default() += u64::from(found);
                Outcome::Acked(found)
            }
            Op::Purge { stream } => {
                let mut purged = super::super::Purged::default();
                for q in model.stored_seqs(*stream) {
                    let v = model.batches.remove(&(stream.is_priority(), *stream, q));
                    purged.batches += 1;
                    purged.bytes += v.map_or(0, |v| v.len() as u64);
                }
                *model.purged.entry(*stream).or_default() += purged.batches;
                Outcome::Purged(purged)
            }
            Op::Flush | Op::Reopen => Outcome::Done,
            Op::Peek { stream, from, max } => Outcome::Peeked(model.peek(*stream, *from, *max)),
        };
        prop_assert_eq!(
            &apply(&mem, op, seq, &bytes),
            &expected,
            "MemStore on {:?}",
            op
        );
        prop_assert_eq!(
            &apply(&sled, op, seq, &bytes),
            &expected,
            "SledStore on {:?}",
            op
        );
        if let Op::Reopen = op {
            drop(sled);
            sled = open(&path);
            prop_assert!(sled.recovered_from().is_none());
        }

        let stats = model.stats();
        prop_assert_eq!(&mem.stats(), &stats, "MemStore stats after {:?}", op);
        prop_assert_eq!(&sled.stats(), &stats, "SledStore stats after {:?}", op);
        for s in Stream::ALL {
            prop_assert_eq!(mem.next_seq(s), model.next_seq(s));
            prop_assert_eq!(sled.next_seq(s), model.next_seq(s));
            let all = model.peek(s, 0, usize::MAX);
            prop_assert_eq!(&mem.peek(s, 0, usize::MAX).unwrap(), &all);
            prop_assert_eq!(&sled.peek(s, 0, usize::MAX).unwrap(), &all);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sled_and_mem_stores_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}

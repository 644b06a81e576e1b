//! Behaviour tests of the store: the same scenarios against [`SledStore`] and [`MemStore`],
//! persistence across reopen, recovery at open, and hostile bytes on disk. The crash test
//! (a SIGKILLed child process) is in `crash.rs`, the proptest model test in `model.rs`, damage
//! and recovery (malformed or corrupt state, reopen in place, the manifest) in `damage.rs`.

mod crash;
mod damage;
mod model;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::reading::Stream;

use super::keys::{self, MetaField};
use super::sled_store::TREE;
use super::{recovery, MemStore, SledStore, Store, StoreError, StoreOptions, StoredBatch};

fn opts(max_bytes: u64) -> StoreOptions {
    StoreOptions {
        max_bytes,
        ..StoreOptions::default()
    }
}

fn open(path: &Path, max_bytes: u64) -> SledStore {
    reopen(path, opts(max_bytes))
}

/// Opens a store that this process may just have dropped.
pub(super) fn reopen(path: &Path, opts: StoreOptions) -> SledStore {
    retry_while_locked(|| SledStore::open(path, opts.clone()))
}

/// sled 0.34 releases its file lock only once its background I/O threads let go of the file,
/// shortly after the `Db` is dropped. A restarted gateway process never sees this; a test that
/// reopens in-process can. Retries only that error, for a bounded time.
fn retry_while_locked<T, E: std::fmt::Display + std::fmt::Debug>(
    mut open: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Err(e) if e.to_string().contains("could not acquire lock") => {
                assert!(Instant::now() < deadline, "lock never released: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other.unwrap(),
        }
    }
}

/// A recognisable envelope stand-in for (stream, seq).
fn payload(stream: Stream, seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8) ^ (seq as u8).wrapping_mul(31) ^ stream.code())
        .collect()
}

fn seqs(store: &dyn Store, stream: Stream) -> Vec<u64> {
    store
        .peek(stream, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|b| b.seq)
        .collect()
}

/// Runs `check` against a fresh SledStore and a fresh MemStore with the same quota.
fn on_both(max_bytes: u64, check: impl Fn(&dyn Store)) {
    let dir = tempfile::tempdir().unwrap();
    check(&open(&dir.path().join("outbox"), max_bytes));
    check(&MemStore::new(max_bytes));
}

#[test]
fn append_flush_peek_ack_round_trip() {
    on_both(1 << 20, |store| {
        assert_eq!(store.next_seq(Stream::Readings), 1);
        let a = payload(Stream::Readings, 1, 100);
        let b = payload(Stream::Readings, 2, 0);
        assert!(store
            .append(Stream::Readings, 1, &a)
            .unwrap()
            .evicted
            .is_empty());
        store.append(Stream::Readings, 2, &b).unwrap();
        store.flush().unwrap();
        assert_eq!(store.next_seq(Stream::Readings), 3);
        assert_eq!(
            store.peek(Stream::Readings, 0, 10).unwrap(),
            vec![
                StoredBatch {
                    stream: Stream::Readings,
                    seq: 1,
                    bytes: a.clone()
                },
                StoredBatch {
                    stream: Stream::Readings,
                    seq: 2,
                    bytes: b
                },
            ]
        );
        let stats = store.stats();
        assert_eq!(
            (
                stats.get(Stream::Readings).batches,
                stats.get(Stream::Readings).bytes
            ),
            (2, 100)
        );
        assert_eq!((stats.total_batches(), stats.total_bytes()), (2, 100));

        assert!(store.ack(Stream::Readings, 2).unwrap());
        assert!(
            !store.ack(Stream::Readings, 2).unwrap(),
            "second ack finds nothing"
        );
        assert!(
            !store.ack(Stream::Alarms, 1).unwrap(),
            "other stream untouched"
        );
        store.flush().unwrap();
        assert_eq!(seqs(store, Stream::Readings), vec![1]);
        assert_eq!(store.stats().get(Stream::Readings).bytes, 100);
        assert_eq!(
            store.next_seq(Stream::Readings),
            3,
            "ack never lowers next_seq"
        );
    });
}

#[test]
fn peek_honours_from_seq_max_and_stream_order() {
    on_both(1 << 20, |store| {
        // Sequence numbers may skip; 256 checks big-endian ordering across a byte boundary.
        for seq in [1, 2, 5, 255, 256, 300] {
            store
                .append(Stream::Readings, seq, &payload(Stream::Readings, seq, 8))
                .unwrap();
        }
        for seq in [1, 2, 3] {
            store
                .append(Stream::Alarms, seq, &payload(Stream::Alarms, seq, 8))
                .unwrap();
        }
        store.append(Stream::Audit, 7, b"audit").unwrap();

        assert_eq!(seqs(store, Stream::Readings), vec![1, 2, 5, 255, 256, 300]);
        let got: Vec<u64> = store
            .peek(Stream::Readings, 3, 3)
            .unwrap()
            .iter()
            .map(|b| b.seq)
            .collect();
        assert_eq!(got, vec![5, 255, 256]);
        assert!(store.peek(Stream::Readings, 301, 10).unwrap().is_empty());
        assert!(store.peek(Stream::Readings, 1, 0).unwrap().is_empty());
        assert_eq!(
            seqs(store, Stream::Alarms),
            vec![1, 2, 3],
            "no readings leak in"
        );
        let audit = store.peek(Stream::Audit, 0, 10).unwrap();
        assert_eq!(
            audit,
            vec![StoredBatch {
                stream: Stream::Audit,
                seq: 7,
                bytes: b"audit".to_vec()
            }]
        );
        assert_eq!(store.next_seq(Stream::Audit), 8);
        assert_eq!(store.next_seq(Stream::Alarms), 4);
    });
}

#[test]
fn seq_regression_is_refused_and_changes_nothing() {
    on_both(1 << 20, |store| {
        store.append(Stream::Alarms, 5, b"five").unwrap();
        let before = store.stats();
        let err = store.append(Stream::Alarms, 5, b"again").unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::SeqRegression {
                    stream: Stream::Alarms,
                    seq: 5,
                    next: 6
                }
            ),
            "{err}"
        );
        assert!(matches!(
            store.append(Stream::Alarms, 0, b""),
            Err(StoreError::SeqRegression { .. })
        ));
        assert!(matches!(
            store.append(Stream::Alarms, u64::MAX, b""),
            Err(StoreError::SeqExhausted { .. })
        ));
        assert_eq!(store.stats(), before);
        assert_eq!(store.peek(Stream::Alarms, 0, 10).unwrap()[0].bytes, b"five");
        // The other streams have their own numbering.
        store.append(Stream::Readings, 1, b"one").unwrap();
    });
}

#[test]
fn sequence_numbers_continue_after_reopen_even_when_everything_was_acked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    {
        let store = open(&path, 1 << 20);
        for seq in 1..=3 {
            store.append(Stream::Readings, seq, b"r").unwrap();
        }
        store.append(Stream::Audit, 10, b"a").unwrap();
        store.flush().unwrap();
    }
    {
        let store = open(&path, 1 << 20);
        assert_eq!(store.next_seq(Stream::Readings), 4);
        assert_eq!(store.next_seq(Stream::Alarms), 1);
        assert_eq!(store.next_seq(Stream::Audit), 11);
        assert_eq!(seqs(&store, Stream::Readings), vec![1, 2, 3]);
        for seq in 1..=3 {
            assert!(store.ack(Stream::Readings, seq).unwrap());
        }
        assert!(store.ack(Stream::Audit, 10).unwrap());
        store.flush().unwrap();
    }
    let store = open(&path, 1 << 20);
    assert_eq!(store.stats().total_batches(), 0, "acks were durable");
    assert_eq!(store.next_seq(Stream::Readings), 4);
    assert_eq!(store.next_seq(Stream::Audit), 11);
    assert!(matches!(
        store.append(Stream::Readings, 3, b"x"),
        Err(StoreError::SeqRegression { .. })
    ));
}

#[test]
fn quota_evicts_oldest_readings_first_and_keeps_alarms_and_audit() {
    on_both(1000, |store| {
        store.append(Stream::Alarms, 1, &[1; 100]).unwrap();
        store.append(Stream::Audit, 1, &[2; 100]).unwrap();
        for seq in 1..=8 {
            assert!(store
                .append(Stream::Readings, seq, &[3; 100])
                .unwrap()
                .evicted
                .is_empty());
        }
        // 1000 bytes stored: every further reading pushes out the oldest reading.
        for seq in 9..=16 {
            let out = store.append(Stream::Readings, seq, &[3; 100]).unwrap();
            assert_eq!(out.evicted, vec![(Stream::Readings, seq - 8, 100)]);
            assert_eq!(seqs(store, Stream::Alarms), vec![1]);
            assert_eq!(seqs(store, Stream::Audit), vec![1]);
        }
        // A big alarm evicts several readings, oldest first, and only as many as needed.
        let out = store.append(Stream::Alarms, 2, &[4; 250]).unwrap();
        assert_eq!(
            out.evicted,
            vec![
                (Stream::Readings, 9, 100),
                (Stream::Readings, 10, 100),
                (Stream::Readings, 11, 100)
            ]
        );
        let stats = store.stats();
        assert_eq!(
            (
                stats.get(Stream::Readings).evicted_batches,
                stats.get(Stream::Readings).evicted_bytes
            ),
            (11, 1100)
        );
        assert_eq!(stats.get(Stream::Alarms).evicted_batches, 0);
        assert_eq!(stats.total_bytes(), 950);
        assert_eq!(stats.max_bytes, 1000);

        // With readings exhausted, alarms go next, then audit.
        let out = store.append(Stream::Audit, 2, &[5; 950]).unwrap();
        let evicted_streams: Vec<Stream> = out.evicted.iter().map(|e| e.0).collect();
        assert_eq!(
            evicted_streams,
            [
                vec![Stream::Readings; 5],
                vec![Stream::Alarms; 2],
                vec![Stream::Audit]
            ]
            .concat()
        );
        assert_eq!(seqs(store, Stream::Audit), vec![2]);
        assert_eq!(store.stats().total_bytes(), 950);
    });
}

#[test]
fn batch_larger_than_the_quota_is_too_large() {
    on_both(100, |store| {
        store.append(Stream::Readings, 1, &[0; 60]).unwrap();
        let err = store.append(Stream::Readings, 2, &[0; 101]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::TooLarge {
                    bytes: 101,
                    max_bytes: 100
                }
            ),
            "{err}"
        );
        assert_eq!(
            seqs(store, Stream::Readings),
            vec![1],
            "nothing evicted for a refused batch"
        );
        assert_eq!(
            store.next_seq(Stream::Readings),
            2,
            "a refused batch uses no seq"
        );
        // Exactly the quota fits, by evicting everything else.
        let out = store.append(Stream::Readings, 2, &[0; 100]).unwrap();
        assert_eq!(out.evicted, vec![(Stream::Readings, 1, 60)]);
    });
}

#[test]
fn eviction_counters_and_quota_state_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    {
        let store = open(&path, 300);
        for seq in 1..=5 {
            store.append(Stream::Readings, seq, &[0; 100]).unwrap();
        }
        store.append(Stream::Alarms, 1, &[0; 250]).unwrap();
        store.flush().unwrap();
        let s = store.stats();
        assert_eq!(
            (
                s.get(Stream::Readings).evicted_batches,
                s.get(Stream::Readings).evicted_bytes
            ),
            (5, 500)
        );
        assert_eq!(
            (
                s.get(Stream::Alarms).evicted_batches,
                s.get(Stream::Alarms).evicted_bytes
            ),
            (0, 0)
        );
    }
    let store = open(&path, 300);
    let s = store.stats();
    assert_eq!(
        (
            s.get(Stream::Readings).batches,
            s.get(Stream::Readings).bytes
        ),
        (0, 0)
    );
    assert_eq!(
        (
            s.get(Stream::Readings).evicted_batches,
            s.get(Stream::Readings).evicted_bytes
        ),
        (5, 500)
    );
    assert_eq!(
        (s.get(Stream::Alarms).batches, s.get(Stream::Alarms).bytes),
        (1, 250)
    );
    assert_eq!(store.next_seq(Stream::Readings), 6);
    // The quota keeps holding after reopen, and a lower quota applies from the next append.
    drop(store);
    let store = open(&path, 200);
    let out = store.append(Stream::Audit, 1, &[0; 10]).unwrap();
    assert_eq!(out.evicted, vec![(Stream::Alarms, 1, 250)]);
    assert_eq!(store.stats().get(Stream::Alarms).evicted_batches, 1);
}

/// issue 11 item 7: a purge destroys every batch of one stream (acknowledged or not), leaves
/// the other streams alone, keeps the stream's sequence numbers and counts what it destroyed;
/// after a reopen the count holds and the manifest does not mistake the purge for loss.
#[test]
fn purge_destroys_one_stream_keeps_its_sequence_and_is_accounted_across_reopen() {
    let emergency = Stream::flow(Stream::MAX_FLOWS - 1).unwrap();
    on_both(1 << 20, |store| {
        for seq in 1..=4 {
            store
                .append(emergency, seq, &payload(emergency, seq, 10))
                .unwrap();
        }
        store.append(Stream::Readings, 1, b"keep").unwrap();
        assert!(store.ack(emergency, 1).unwrap());
        let purged = store.purge(emergency).unwrap();
        assert_eq!(
            purged,
            super::Purged {
                batches: 3,
                bytes: 30
            }
        );
        assert_eq!(seqs(store, emergency), Vec::<u64>::new());
        assert_eq!(seqs(store, Stream::Readings), vec![1]);
        let st = store.stats();
        assert_eq!(st.get(emergency).purged_batches, 3);
        assert_eq!(st.get(emergency).acked_batches, 1);
        assert_eq!((st.get(emergency).batches, st.get(emergency).bytes), (0, 0));
        assert_eq!(store.next_seq(emergency), 5);
        assert!(matches!(
            store.append(emergency, 4, b"x"),
            Err(StoreError::SeqRegression { .. })
        ));
        assert_eq!(store.purge(emergency).unwrap(), super::Purged::default());
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    {
        let store = open(&path, 1 << 20);
        for seq in 1..=2 {
            store.append(emergency, seq, b"e").unwrap();
        }
        store.flush().unwrap();
        store.purge(emergency).unwrap();
        store.flush().unwrap();
    }
    let store = open(&path, 1 << 20);
    assert!(store.recovery().is_none(), "a purge is not damage");
    assert_eq!(store.stats().get(emergency).purged_batches, 2);
    assert_eq!(store.next_seq(emergency), 3);
    assert_eq!(seqs(&store, emergency), Vec::<u64>::new());
}

/// issue 11 (windows survive a crash): the checkpoint is replaced with the batch it goes
/// with, or on its own, survives a reopen, and is neither malformed nor damage to the store
/// or its offline check.
#[test]
fn checkpoints_go_with_their_batch_and_survive_reopen() {
    on_both(1 << 20, |store| {
        assert_eq!(store.checkpoint().unwrap(), None);
        store
            .append_checkpointed(Stream::Readings, 1, b"agg", b"state-1")
            .unwrap();
        assert_eq!(
            store.checkpoint().unwrap().as_deref(),
            Some(&b"state-1"[..])
        );
        store.put_checkpoint(b"state-2").unwrap();
        assert_eq!(
            store.checkpoint().unwrap().as_deref(),
            Some(&b"state-2"[..])
        );
        // A refused append changes nothing, not even the checkpoint.
        assert!(store
            .append_checkpointed(Stream::Readings, 1, b"again", b"state-3")
            .is_err());
        assert_eq!(
            store.checkpoint().unwrap().as_deref(),
            Some(&b"state-2"[..])
        );
        assert_eq!(seqs(store, Stream::Readings), vec![1]);
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    {
        let store = open(&path, 1 << 20);
        store
            .append_checkpointed(Stream::Readings, 1, b"agg", &[7; 3000])
            .unwrap();
        store.flush().unwrap();
    }
    let store = open(&path, 1 << 20);
    assert!(store.recovery().is_none());
    assert_eq!(store.malformed_keys(), 0);
    assert_eq!(store.checkpoint().unwrap(), Some(vec![7; 3000]));
    drop(store);
    let report = retry_while_locked(|| super::check_offline(&path));
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

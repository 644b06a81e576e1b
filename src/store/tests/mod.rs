//! Behaviour tests of the store: the same scenarios against [`SledStore`] and [`MemStore`],
//! persistence across reopen, recovery at open, and hostile bytes on disk. The crash test
//! (a SIGKILLed child process) is in `crash.rs`, the proptest model test in `model.rs`.

mod crash;
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
        assert_eq!((stats.readings.batches, stats.readings.bytes), (2, 100));
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
            (stats.readings.evicted_batches, stats.readings.evicted_bytes),
            (11, 1100)
        );
        assert_eq!(stats.alarms.evicted_batches, 0);
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
            (s.readings.evicted_batches, s.readings.evicted_bytes),
            (5, 500)
        );
        assert_eq!((s.alarms.evicted_batches, s.alarms.evicted_bytes), (0, 0));
    }
    let store = open(&path, 300);
    let s = store.stats();
    assert_eq!((s.readings.batches, s.readings.bytes), (0, 0));
    assert_eq!(
        (s.readings.evicted_batches, s.readings.evicted_bytes),
        (5, 500)
    );
    assert_eq!((s.alarms.batches, s.alarms.bytes), (1, 250));
    assert_eq!(store.next_seq(Stream::Readings), 6);
    // The quota keeps holding after reopen, and a lower quota applies from the next append.
    drop(store);
    let store = open(&path, 200);
    let out = store.append(Stream::Audit, 1, &[0; 10]).unwrap();
    assert_eq!(out.evicted, vec![(Stream::Alarms, 1, 250)]);
    assert_eq!(store.stats().alarms.evicted_batches, 1);
}

/// Writes raw entries into the store's tree behind its back.
fn poke_raw(path: &Path, entries: &[(&[u8], &[u8])]) {
    let db = retry_while_locked(|| recovery::config(path, &StoreOptions::default()).open());
    let tree = db.open_tree(TREE).unwrap();
    for (k, v) in entries {
        tree.insert(k, *v).unwrap();
    }
    db.flush().unwrap();
}

#[test]
fn malformed_keys_are_skipped_at_open_and_in_peek() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    {
        let store = open(&path, 1000);
        store.append(Stream::Readings, 1, b"one").unwrap();
        store.append(Stream::Readings, 2, b"two").unwrap();
    }
    poke_raw(
        &path,
        &[
            (
                &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                b"too long, inside the readings range",
            ),
            (&[0, 1, 2], b"too short"),
            (&[9, 0, 0, 0, 0, 0, 0, 0, 1], b"unknown stream code"),
            (b"\xFFnext_seq/elsewhere", b"unknown metadata"),
            (b"", b"empty key"),
        ],
    );
    let store = open(&path, 1000);
    assert_eq!(store.malformed_keys(), 5);
    assert_eq!(store.stats().readings.batches, 2);
    assert_eq!(seqs(&store, Stream::Readings), vec![1, 2]);
    assert_eq!(
        store.peek(Stream::Readings, 0, 2).unwrap().len(),
        2,
        "garbage does not use up max"
    );
    // Evictions walk past the garbage too.
    let out = store.append(Stream::Readings, 3, &[0; 998]).unwrap();
    assert_eq!(
        out.evicted,
        vec![(Stream::Readings, 1, 3), (Stream::Readings, 2, 3)]
    );
}

/// A metadata value of the wrong length is not guessed: the store is damaged, moved aside
/// and replaced (a fresh incarnation, so nothing it sends can be taken for a replay).
#[test]
fn metadata_value_of_the_wrong_length_is_corrupt_not_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let id = {
        let store = open(&path, 1000);
        store.append(Stream::Alarms, 1, b"a").unwrap();
        store.flush().unwrap();
        store.incarnation()
    };
    poke_raw(
        &path,
        &[(
            &keys::meta_key(MetaField::NextSeq, Stream::Alarms),
            b"\x01\x02",
        )],
    );
    let store = open(&path, 1000);
    let r = store
        .recovery()
        .expect("a short metadata value must not open");
    assert!(r.reason.contains("unreadable"), "{r:?}");
    assert!(r.batches_lost >= 1, "{r:?}");
    assert_ne!(store.incarnation(), id);
    assert_eq!(store.stats().total_batches(), 0);
}

#[test]
fn corrupt_store_is_moved_aside_and_a_fresh_one_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    {
        let store = open(&path, 1000);
        store.append(Stream::Readings, 1, b"lost").unwrap();
        store.flush().unwrap();
        assert!(store.recovered_from().is_none());
    }
    // sled checks its persisted storage parameters first; garbage there is Corruption.
    std::fs::write(path.join("conf"), b"segment_size: banana\n").unwrap();

    let store = open(&path, 1000);
    let moved = store
        .recovered_from()
        .expect("store was recovered")
        .to_path_buf();
    let name = moved.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("outbox.corrupt-"), "{name}");
    assert_eq!(moved.parent(), path.parent());
    assert!(
        moved.join("conf").is_file(),
        "the old data is kept for forensics"
    );
    assert_eq!(store.stats().total_batches(), 0);
    assert_eq!(store.next_seq(Stream::Readings), 1);
    store.append(Stream::Readings, 1, b"fresh").unwrap();
    store.flush().unwrap();
    drop(store);

    // A second corruption in the same second picks a different name.
    std::fs::write(path.join("conf"), b"segment_size: banana\n").unwrap();
    let store = open(&path, 1000);
    let again = store.recovered_from().expect("store was recovered");
    assert_ne!(again, moved.as_path());
    assert!(moved.is_dir() && again.is_dir());
}

#[test]
fn plain_io_errors_are_returned_not_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    // The path is a regular file: sled cannot create its directory.
    let path = dir.path().join("outbox");
    std::fs::write(&path, b"not a directory").unwrap();
    let err = SledStore::open(&path, opts(1000)).unwrap_err();
    assert!(matches!(err, StoreError::Sled(sled::Error::Io(_))), "{err}");
    assert!(path.is_file(), "left where it was");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing moved aside"
    );
}

#[test]
fn a_store_held_by_another_instance_is_an_error_not_a_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let first = open(&path, 1000);
    first.append(Stream::Alarms, 1, b"keep me").unwrap();
    first.flush().unwrap();
    let err = SledStore::open(&path, opts(1000)).unwrap_err();
    assert!(matches!(err, StoreError::Sled(_)), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing moved aside"
    );
    assert_eq!(seqs(&first, Stream::Alarms), vec![1]);
}

#[test]
fn snapshot_with_a_bad_checksum_is_moved_aside() {
    // The field failure after `docker stop` (sled#1527): a snapshot whose CRC does not match.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    {
        let store = open(&path, 1000);
        store.append(Stream::Audit, 1, b"kept aside").unwrap();
        store.flush().unwrap();
    }
    std::fs::write(path.join("snap.0000000000000001"), [0xA5; 64]).unwrap();
    let store = open(&path, 1000);
    let moved = store.recovered_from().expect("store was recovered");
    assert!(moved.join("db").is_file());
    assert_eq!(store.stats().total_batches(), 0);
}

#[test]
fn incarnation_is_random_non_zero_and_stable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let first = {
        let store = open(&path, 1000);
        store.append(Stream::Readings, 1, b"r").unwrap();
        store.flush().unwrap();
        store.incarnation()
    };
    assert_ne!(first, 0);
    assert_eq!(
        open(&path, 1000).incarnation(),
        first,
        "stable across reopen"
    );

    // A store moved aside and replaced by a fresh one is a new incarnation.
    std::fs::rename(&path, dir.path().join("aside")).unwrap();
    let fresh = open(&path, 1000).incarnation();
    assert_ne!(fresh, 0);
    assert_ne!(fresh, first);

    let (a, b) = (MemStore::new(10), MemStore::new(10));
    assert_ne!(a.incarnation(), 0);
    assert_ne!(a.incarnation(), b.incarnation());
}

#[test]
fn a_store_written_before_incarnation_ids_gets_one_at_open_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    {
        // The older layout: batches and metadata, no incarnation key.
        let db = recovery::config(&path, &StoreOptions::default())
            .open()
            .unwrap();
        let tree = db.open_tree(TREE).unwrap();
        tree.insert(keys::batch_key(Stream::Alarms, 5), &b"old"[..])
            .unwrap();
        tree.insert(
            keys::meta_key(MetaField::NextSeq, Stream::Alarms),
            &keys::encode_u64(6)[..],
        )
        .unwrap();
        db.flush().unwrap();
    }
    let id = {
        let store = open(&path, 1000);
        assert_eq!(seqs(&store, Stream::Alarms), vec![5]);
        assert_eq!(store.malformed_keys(), 0);
        store.incarnation()
    };
    assert_ne!(id, 0);
    let store = open(&path, 1000);
    assert_eq!(store.incarnation(), id, "persisted at the first open");
    assert_eq!(store.malformed_keys(), 0);
}

/// issue 9 item 2: a store whose engine keeps failing writes is reopened in place: committed
/// batches, counters, sequence numbers and incarnation come back, and writes work again.
#[test]
fn a_poisoned_store_reopens_in_place_and_writes_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    let store = open(&path, 1 << 20);
    let id = store.incarnation();
    store.append(Stream::Readings, 1, b"one").unwrap();
    store.append(Stream::Alarms, 7, b"alarm").unwrap();
    store.flush().unwrap();

    store.poison_for_test();
    assert!(store.append(Stream::Readings, 2, b"two").is_err());
    assert!(store.flush().is_err());
    assert!(store.ack(Stream::Readings, 1).is_err());
    assert!(
        store.append(Stream::Readings, 2, b"two").is_err(),
        "stays failed"
    );

    store.reopen().unwrap();
    assert_eq!(store.incarnation(), id);
    assert_eq!(seqs(&store, Stream::Readings), vec![1]);
    assert_eq!(seqs(&store, Stream::Alarms), vec![7]);
    assert_eq!(store.stats().total_batches(), 2);
    assert_eq!(store.next_seq(Stream::Alarms), 8);
    store.append(Stream::Readings, 2, b"two").unwrap();
    assert!(store.ack(Stream::Readings, 1).unwrap());
    store.flush().unwrap();
    drop(store);

    let store = open(&path, 1 << 20);
    assert_eq!(seqs(&store, Stream::Readings), vec![2]);
    assert_eq!(store.incarnation(), id);
}

/// After a reopen the ledger is what is on disk: a batch staged before the failure is
/// either there (appending it again is a `SeqRegression`, "already stored") or can be
/// appended again under its own sequence number; it is never skipped and lost.
#[test]
fn a_batch_staged_before_a_reopen_is_stored_once_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("outbox"), 1 << 20);
    store.append(Stream::Audit, 5, b"staged").unwrap();
    store.poison_for_test();
    assert!(store.flush().is_err());
    store.reopen().unwrap();
    match store.append(Stream::Audit, 5, b"staged") {
        Ok(_) => {}
        Err(StoreError::SeqRegression { .. }) => {}
        Err(e) => panic!("{e}"),
    }
    store.flush().unwrap();
    assert_eq!(seqs(&store, Stream::Audit), vec![5]);
    assert_eq!(store.next_seq(Stream::Audit), 6);
}

/// A stopped store with 6 batches (2 per stream, one of them acknowledged and deleted).
fn stopped_store_with_six_batches(path: &Path) -> u64 {
    let store = open(path, 1 << 20);
    for s in Stream::ALL {
        for seq in 1..=2 {
            store.append(s, seq, &payload(s, seq, 300)).unwrap();
        }
    }
    store.append(Stream::Readings, 3, b"acked").unwrap();
    store.flush().unwrap();
    assert!(store.ack(Stream::Readings, 3).unwrap());
    store.flush().unwrap();
    assert_eq!(store.stats().total_batches(), 6);
    store.incarnation()
}

/// Opens a damaged store and checks it was detected, kept and replaced by a fresh one.
fn assert_damage_detected(path: &Path, old_incarnation: u64, case: &str) {
    let store = open(path, 1 << 20);
    let recovery = store
        .recovery()
        .unwrap_or_else(|| panic!("{case}: opened silently with {:?}", store.stats()));
    assert!(recovery.batches_lost >= 1, "{case}: {recovery:?}");
    assert!(recovery.moved_to.is_dir(), "{case}: kept for forensics");
    assert!(
        recovery
            .moved_to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("outbox.corrupt-"),
        "{case}: {recovery:?}"
    );
    assert_eq!(store.stats().total_batches(), 0, "{case}");
    assert_ne!(store.incarnation(), old_incarnation, "{case}");
    store.append(Stream::Alarms, 1, b"fresh").unwrap();
    store.flush().unwrap();
    drop(store);
    // The fresh store is healthy: it opens without another recovery.
    assert!(open(path, 1 << 20).recovery().is_none(), "{case}");
}

/// issue 9 item 3: the four damage cases of the issue are each detected on open, the store
/// is moved aside and a fresh one started (no silent `batches=1` or `batches=0`).
#[test]
fn a_damaged_store_never_opens_silently_emptier() {
    use rand::{Rng, SeedableRng};
    type Damage = fn(&Path, &mut rand_chacha::ChaCha8Rng);
    let damages: [(&str, Damage); 4] = [
        ("50 flipped bytes", |db, rng| {
            let mut bytes = std::fs::read(db).unwrap();
            for _ in 0..50 {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] ^= rng.gen_range(1..=255u8);
            }
            std::fs::write(db, bytes).unwrap();
        }),
        ("zero-length db", |db, _| {
            std::fs::write(db, b"").unwrap();
        }),
        ("random db", |db, rng| {
            let len = std::fs::metadata(db).unwrap().len() as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            std::fs::write(db, bytes).unwrap();
        }),
        ("missing db", |db, _| {
            std::fs::remove_file(db).unwrap();
        }),
    ];
    for (case, damage) in damages {
        for seed in 0..3u64 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("outbox");
            let id = stopped_store_with_six_batches(&path);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            damage(&path.join("db"), &mut rng);
            assert_damage_detected(&path, id, &format!("{case} (seed {seed})"));
        }
    }
}

/// A stopped store that is intact opens without a recovery, acknowledgements included.
#[test]
fn an_intact_store_with_acks_and_evictions_is_not_mistaken_for_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox");
    stopped_store_with_six_batches(&path);
    {
        let store = open(&path, 2000);
        // Evicts the oldest readings.
        let out = store.append(Stream::Readings, 4, &[0; 600]).unwrap();
        assert_eq!(out.evicted.len(), 2);
        assert!(store.ack(Stream::Alarms, 1).unwrap());
        store.flush().unwrap();
        // Changes after the last flush may or may not be durable; either is fine.
        assert!(store.ack(Stream::Alarms, 2).unwrap());
    }
    let store = open(&path, 2000);
    assert!(store.recovery().is_none(), "{:?}", store.recovery());
}

/// issue 9 item 14: absurd sequence state (a batch key or `next_seq` at `u64::MAX`, an
/// eviction counter at `u64::MAX`) is corruption: moved aside, not a wedged store.
#[test]
fn absurd_sequence_state_is_moved_aside_at_open() {
    let cases: [(&str, Vec<u8>, Vec<u8>); 3] = [
        (
            "batch key",
            keys::batch_key(Stream::Readings, u64::MAX).to_vec(),
            b"x".to_vec(),
        ),
        (
            "next_seq",
            keys::meta_key(MetaField::NextSeq, Stream::Alarms),
            keys::encode_u64(u64::MAX).to_vec(),
        ),
        (
            "eviction counter",
            keys::meta_key(MetaField::EvictedBatches, Stream::Readings),
            keys::encode_u64(u64::MAX).to_vec(),
        ),
    ];
    for (case, k, v) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let id = {
            let store = open(&path, 1000);
            store.append(Stream::Readings, 1, b"r").unwrap();
            store.flush().unwrap();
            store.incarnation()
        };
        poke_raw(&path, &[(&k, &v)]);
        let store = open(&path, 1000);
        let r = store
            .recovery()
            .unwrap_or_else(|| panic!("{case}: opened with absurd state"));
        assert!(r.reason.contains("absurd"), "{case}: {r:?}");
        assert_ne!(store.incarnation(), id);
        store.append(Stream::Readings, 1, b"fresh").unwrap();
    }
}

/// issue 9 item 14: eviction counters that would overflow fail the append; nothing wraps.
#[test]
fn an_eviction_counter_at_the_limit_fails_the_append_instead_of_overflowing() {
    let store = MemStore::new(10);
    store.append(Stream::Readings, 1, &[0; 10]).unwrap();
    {
        let mut inner = store.inner_for_test();
        inner
            .ledger
            .restore_meta(MetaField::EvictedBatches, Stream::Readings, u64::MAX);
    }
    let err = store.append(Stream::Readings, 2, &[0; 10]).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(seqs(&store, Stream::Readings), vec![1], "nothing changed");
}

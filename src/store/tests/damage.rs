//! Damage and recovery: malformed keys and metadata, corrupt and poisoned stores, the
//! incarnation id, the manifest check (issue 9 items 2, 3 and 14).

use super::*;

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
            (&[200, 0, 0, 0, 0, 0, 0, 0, 1], b"unknown stream code"),
            (b"\xFFnext_seq/elsewhere", b"unknown metadata"),
            (b"", b"empty key"),
        ],
    );
    let store = open(&path, 1000);
    assert_eq!(store.malformed_keys(), 5);
    assert_eq!(store.stats().get(Stream::Readings).batches, 2);
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
    for s in [Stream::Readings, Stream::Alarms, Stream::Audit] {
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

//! The sink across crashes and restarts: unmarked batches, torn writes, odd values.

use super::*;

#[test]
fn a_batch_in_the_sink_but_not_marked_is_marked_at_restart() {
    let f = Fixture::new();
    let env = f.seal(Stream::Readings, 11);
    {
        // The crash window: the sink has the batch, the de-dup state does not.
        let sink = JsonlSink::open(&f.sink_path()).unwrap();
        let key = BatchKey {
            gateway: gw(),
            stream: Stream::Readings,
            incarnation: INC,
            seq: 11,
        };
        sink.write_batch(&key, &records()).unwrap();
    }
    let hub = f.hub();
    assert_eq!(hub.stats().recovered_batches, 1);
    assert_eq!(
        hub.ingest(&gw(), &env),
        Ingest::Duplicate {
            ack: ack(Stream::Readings, 11)
        }
    );
    assert_eq!(f.lines().len(), 4);
}

#[test]
fn a_torn_unacknowledged_batch_is_cut_and_rewritten_whole() {
    let f = Fixture::new();
    let hub = f.hub();
    assert!(matches!(
        hub.ingest(&gw(), &f.seal(Stream::Readings, 1)),
        Ingest::Accepted { .. }
    ));
    drop(hub);
    let key = BatchKey {
        gateway: gw(),
        stream: Stream::Readings,
        incarnation: INC,
        seq: 2,
    };
    let bytes = sink::encode_batch(&SinkBatch {
        key: &key,
        purpose: None,
        header: None,
        records: &records(),
    });
    let first_line = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(f.sink_path())
        .unwrap();
    std::io::Write::write_all(&mut file, &bytes[..first_line + 10]).unwrap();
    drop(file);

    let hub = f.hub();
    assert_eq!(hub.stats().recovered_batches, 0);
    assert_eq!(
        f.lines().len(),
        4,
        "the partial batch 2 is cut, batch 1 kept"
    );
    assert!(matches!(
        hub.ingest(&gw(), &f.seal(Stream::Readings, 2)),
        Ingest::Accepted { .. }
    ));
    let lines = f.lines();
    assert_eq!(lines.len(), 8);
    assert_eq!(lines.iter().filter(|l| l["seq"] == 2).count(), 4);
}

#[test]
fn non_finite_floats_and_out_of_range_times_are_null_not_panics() {
    let key = BatchKey {
        gateway: gw(),
        stream: Stream::Readings,
        incarnation: INC,
        seq: 1,
    };
    let mut r = records().remove(1);
    r.value = Value::Float(f64::NAN);
    r.at_ms = -1;
    let mut late = r.clone();
    late.at_ms = i64::MAX;
    let text = String::from_utf8(sink::encode_batch(&SinkBatch {
        key: &key,
        purpose: None,
        header: None,
        records: &[r, late],
    }))
    .unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["value"].is_null() && v["timestamp"].is_null(), "{line}");
    }
    assert_eq!(sink::rfc3339_ms(0).unwrap(), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        sink::rfc3339_ms(253_402_300_799_999).unwrap(),
        "9999-12-31T23:59:59.999Z"
    );
}

/// issue 12 item 4: a sink with `rotate_bytes` starts a fresh file before the write that
/// finds the current one full; every batch is in exactly one file, and after a restart
/// re-sent batches are still recognised as duplicates.
#[test]
fn a_full_sink_rotates_to_a_timestamped_file_and_restarts_see_no_gap() {
    let f = Fixture::new();
    let rotation = config::Rotation {
        bytes: Some(1),
        every: None,
    };
    let open_hub = || {
        let sink =
            JsonlDedupSink::open(&f.dir.path().join("state"), &f.sink_path(), rotation).unwrap();
        let signer = crate::wire::AckSigner::new(
            seal::load_hub_ack_signing_key(&f.keys.hub_ack_signing_key).unwrap(),
        );
        Hub::new(f.opener(), signer, approvals(), Box::new(sink))
    };
    let hub = open_hub();
    for seq in 1..=3 {
        assert!(matches!(
            hub.ingest(&gw(), &f.seal(Stream::Readings, seq)),
            Ingest::Accepted { .. }
        ));
    }
    drop(hub);
    let dir = f.sink_path().parent().unwrap().to_path_buf();
    let mut rotated: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "records.jsonl")
        .collect();
    rotated.sort();
    assert_eq!(rotated.len(), 2, "{rotated:?}");
    assert!(
        rotated.iter().all(|n| n.starts_with("records-")
            && n.ends_with(".jsonl")
            && n.contains('T')
            && n.contains('Z')),
        "{rotated:?}"
    );
    let seqs = |name: &str| -> Vec<u64> {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        let mut s: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        s.dedup();
        s
    };
    let mut all: Vec<u64> = rotated.iter().flat_map(|n| seqs(n)).collect();
    all.extend(seqs("records.jsonl"));
    all.sort_unstable();
    assert_eq!(all, [1, 2, 3], "each batch in exactly one file");
    assert_eq!(seqs("records.jsonl"), [3]);

    let hub = open_hub();
    assert!(matches!(
        hub.ingest(&gw(), &f.seal(Stream::Readings, 2)),
        Ingest::Duplicate { .. }
    ));
    assert_eq!(hub.stats().recovered_batches, 0);
}

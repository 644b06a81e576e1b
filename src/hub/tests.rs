//! Hub tests: real keys, real sealed batches, real sled and files in a temp dir.

use std::path::PathBuf;

use proptest::prelude::*;
use tempfile::TempDir;

use crate::reading::{GatewayId, PurposeName, Quality, QualityReason, Record, Stream, Unit, Value};
use crate::seal::{self, Opener, PolicyStamp, Sealer};

use super::*;

mod emergency;
mod logs;
mod policy;
mod restart;
mod sinks;

pub(in crate::hub) use crate::test_fixtures::capture_warnings;

fn gw() -> GatewayId {
    GatewayId::new("gw-1").unwrap()
}

/// The purpose and policy hash the fixture's gateway seals under.
fn stamp() -> PolicyStamp {
    PolicyStamp::new(PurposeName::new("billing").unwrap(), [7; 32])
}

/// The registry of the fixture's hub: gw-1 is approved for [`stamp`] only.
fn approvals() -> Approvals {
    Approvals::new(&[config::GatewayEntry {
        id: gw(),
        verifying_key: "unused".into(),
        policies: vec![ApprovedPolicy {
            stamp: stamp(),
            retention: None,
        }],
    }])
}

/// The store incarnation the fixture's gateway seals under.
const INC: u64 = 0x5eed_0000_0000_0001;

struct Fixture {
    dir: TempDir,
    keys: seal::GeneratedKeys,
    sealer: Sealer,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keys = seal::generate(&dir.path().join("keys"), false).unwrap();
        let sealer = Sealer::new(
            gw(),
            seal::load_signing_key(&keys.signing_key).unwrap(),
            seal::load_hub_public_key(&keys.hub_public_key).unwrap(),
            INC,
        );
        Fixture { dir, keys, sealer }
    }

    fn sink_path(&self) -> PathBuf {
        self.dir.path().join("out/records.jsonl")
    }

    fn opener(&self) -> Opener {
        let mut opener = Opener::new(seal::load_hub_secret_key(&self.keys.hub_secret_key).unwrap());
        opener.register(
            gw(),
            seal::load_verifying_key(&self.keys.verifying_key).unwrap(),
        );
        opener
    }

    fn hub(&self) -> Hub {
        let sink = JsonlDedupSink::open(
            &self.dir.path().join("state"),
            &self.sink_path(),
            config::Rotation::default(),
        )
        .unwrap();
        let signer = crate::wire::AckSigner::new(
            seal::load_hub_ack_signing_key(&self.keys.hub_ack_signing_key).unwrap(),
        );
        Hub::new(self.opener(), signer, approvals(), Box::new(sink))
    }

    fn seal(&self, stream: Stream, seq: u64) -> Vec<u8> {
        self.sealer
            .seal(stream, seq, 1_700_000_000_000, &stamp(), &records())
            .unwrap()
            .bytes
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.sink_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn records() -> Vec<Record> {
    let r = |field: &str, value, unit, quality, tags: &[&str]| Record {
        subject: "p-0123456789abcdef0123456789abcdef".into(),
        field: field.into(),
        value,
        unit,
        at_ms: 1_700_000_000_000,
        quality,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        window: None,
        epoch: 0,
    };
    vec![
        r(
            "energy_import",
            Value::Int(123_456_789),
            Unit::WattHour,
            Quality::Good,
            &[],
        ),
        r(
            "voltage_l1",
            Value::Float(230.5),
            Unit::Volt,
            Quality::Uncertain(QualityReason::OutOfRange),
            &["emergency"],
        ),
        r(
            "tamper",
            Value::Bool(true),
            Unit::One,
            Quality::Bad(QualityReason::NotAvailable),
            &[],
        ),
        r(
            "meter_id",
            Value::Text("p-ab".into()),
            Unit::One,
            Quality::Good,
            &[],
        ),
    ]
}

fn ack(stream: Stream, seq: u64) -> Ack {
    Ack {
        gateway: gw(),
        stream,
        incarnation: INC,
        seq,
    }
}

fn rejected(i: Ingest) -> &'static str {
    match i {
        Ingest::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn accepted_batch_is_written_once_with_every_field() {
    let f = Fixture::new();
    let hub = f.hub();
    let out = hub.ingest(&gw(), &f.seal(Stream::Readings, 42));
    assert_eq!(
        out,
        Ingest::Accepted {
            ack: ack(Stream::Readings, 42),
            records: 4
        }
    );
    let lines = f.lines();
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[0],
        serde_json::json!({
            "gateway": "gw-1", "stream": "readings",
            "incarnation": "5eed000000000001", "seq": 42, "purpose": "billing",
            "subject": "p-0123456789abcdef0123456789abcdef", "field": "energy_import",
            "value": 123_456_789, "unit": "Wh", "at_ms": 1_700_000_000_000_i64,
            "timestamp": "2023-11-14T22:13:20.000Z", "quality": "good", "tags": []
        })
    );
    assert_eq!(lines[1]["value"], 230.5);
    assert_eq!(lines[1]["quality"], "uncertain:out_of_range");
    assert_eq!(lines[1]["tags"], serde_json::json!(["emergency"]));
    assert_eq!(lines[2]["value"], true);
    assert_eq!(lines[2]["quality"], "bad:not_available");
    assert_eq!(lines[3]["value"], "p-ab");
    let raw = std::fs::read_to_string(f.sink_path()).unwrap();
    assert!(
        raw.starts_with(
            r#"{"gateway":"gw-1","stream":"readings","incarnation":"5eed000000000001","seq":42,"purpose":"billing","subject""#
        ),
        "{raw}"
    );

    // The same batch again (re-sealed, as a gateway would re-send the stored envelope or not).
    let again = hub.ingest(&gw(), &f.seal(Stream::Readings, 42));
    assert_eq!(
        again,
        Ingest::Duplicate {
            ack: ack(Stream::Readings, 42)
        }
    );
    assert_eq!(f.lines().len(), 4);
    let s = hub.stats();
    assert_eq!(
        (s.accepted_batches, s.records_written, s.duplicates),
        (1, 4, 1)
    );
}

/// Issue 11 item 3: a batch under a policy its gateway is not approved for — an unknown purpose,
/// or the approved purpose under a changed hash — is rejected as `unapproved_policy`, counted,
/// not acknowledged and not written; the built-in gateway stamp passes on the audit stream only.
#[test]
fn dedup_survives_a_new_hub_over_the_same_paths() {
    let f = Fixture::new();
    let env = f.seal(Stream::Alarms, 3);
    assert!(matches!(
        f.hub().ingest(&gw(), &env),
        Ingest::Accepted { .. }
    ));
    let hub = f.hub();
    assert_eq!(
        hub.ingest(&gw(), &env),
        Ingest::Duplicate {
            ack: ack(Stream::Alarms, 3)
        }
    );
    assert_eq!(hub.stats().recovered_batches, 0);
    assert_eq!(f.lines().len(), 4);
}

/// issue 10 item 3: a group of payloads (the backlog the hub finds waiting) gets the same
/// outcomes as one at a time — new batches written once, a copy within the group and one
/// seen before acknowledged unwritten, a tampered one rejected — in one sink write.
#[test]
fn a_group_is_ingested_as_one_at_a_time_would_be() {
    let f = Fixture::new();
    let hub = f.hub();
    assert!(matches!(
        hub.ingest(&gw(), &f.seal(Stream::Readings, 1)),
        Ingest::Accepted { .. }
    ));
    let two = f.seal(Stream::Readings, 2);
    let mut tampered = f.seal(Stream::Readings, 4);
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let payloads = [
        two.clone(),
        f.seal(Stream::Readings, 1),
        two,
        tampered,
        f.seal(Stream::Alarms, 3),
    ];
    let group: Vec<(GatewayId, &[u8])> = payloads.iter().map(|p| (gw(), &p[..])).collect();
    let out = hub.ingest_group(&group);
    assert_eq!(
        out[..3],
        [
            Ingest::Accepted {
                ack: ack(Stream::Readings, 2),
                records: 4
            },
            Ingest::Duplicate {
                ack: ack(Stream::Readings, 1)
            },
            Ingest::Duplicate {
                ack: ack(Stream::Readings, 2)
            },
        ]
    );
    assert!(matches!(out[3], Ingest::Rejected { .. }), "{:?}", out[3]);
    assert_eq!(
        out[4],
        Ingest::Accepted {
            ack: ack(Stream::Alarms, 3),
            records: 4
        }
    );
    assert_eq!(f.lines().len(), 3 * 4);
    let stats = hub.stats();
    assert_eq!((stats.accepted_batches, stats.duplicates), (3, 2));
    // The group's marks are durable: a new hub over the same state sees them.
    drop(hub);
    let again = f.hub();
    assert!(matches!(
        again.ingest(&gw(), &f.seal(Stream::Alarms, 3)),
        Ingest::Duplicate { .. }
    ));
}

#[test]
fn replay_of_an_old_seq_after_newer_ones_is_a_duplicate() {
    let f = Fixture::new();
    let hub = f.hub();
    let old = f.seal(Stream::Readings, 1);
    for seq in [1, 2, 3, 5, 4, 6] {
        assert!(matches!(
            hub.ingest(&gw(), &f.seal(Stream::Readings, seq)),
            Ingest::Accepted { .. }
        ));
    }
    assert_eq!(
        hub.ingest(&gw(), &old),
        Ingest::Duplicate {
            ack: ack(Stream::Readings, 1)
        }
    );
    // Other streams have their own sequence numbers.
    assert!(matches!(
        hub.ingest(&gw(), &f.seal(Stream::Audit, 1)),
        Ingest::Accepted { .. }
    ));
    assert_eq!(f.lines().len(), 7 * 4);
}

#[test]
fn tampered_unknown_version_and_mismatched_topic_are_rejected() {
    let f = Fixture::new();
    let hub = f.hub();
    let env = f.seal(Stream::Readings, 9);

    let mut flipped = env.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    assert_eq!(rejected(hub.ingest(&gw(), &flipped)), "bad_signature");

    let mut version = env.clone();
    version[4] = 9;
    assert_eq!(rejected(hub.ingest(&gw(), &version)), "unknown_version");

    let other = GatewayId::new("gw-2").unwrap();
    assert_eq!(rejected(hub.ingest(&other, &env)), "topic_mismatch");

    let s = hub.stats();
    assert_eq!(s.rejected.get("bad_signature"), Some(&1));
    assert_eq!(s.rejected.get("unknown_version"), Some(&1));
    assert_eq!(s.rejected.get("topic_mismatch"), Some(&1));
    assert!(f.lines().is_empty());
    // Nothing of that was marked: the genuine batch is still new.
    assert!(matches!(hub.ingest(&gw(), &env), Ingest::Accepted { .. }));
}

#[test]
fn unregistered_gateway_and_unregistered_key_are_rejected() {
    let f = Fixture::new();
    let hub = f.hub();
    let hub_pub = seal::load_hub_public_key(&f.keys.hub_public_key).unwrap();
    let stranger = Sealer::new(
        GatewayId::new("gw-9").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[3; 32]),
        hub_pub.clone(),
        INC,
    );
    let env = stranger
        .seal(Stream::Readings, 1, 0, &stamp(), &records())
        .unwrap()
        .bytes;
    assert_eq!(
        rejected(hub.ingest(&GatewayId::new("gw-9").unwrap(), &env)),
        "unknown_gateway"
    );

    let impostor = Sealer::new(
        gw(),
        ed25519_dalek::SigningKey::from_bytes(&[4; 32]),
        hub_pub,
        INC,
    );
    let env = impostor
        .seal(Stream::Readings, 1, 0, &stamp(), &records())
        .unwrap()
        .bytes;
    assert_eq!(rejected(hub.ingest(&gw(), &env)), "unknown_signer_key");
    assert!(f.lines().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn garbage_never_panics_and_is_never_acked(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        flip in any::<proptest::sample::Index>(),
        bit in 0u8..8,
    ) {
        let f = Fixture::new();
        let hub = f.hub();
        prop_assert!(hub.ingest(&gw(), &bytes).ack().is_none());
        let mut env = f.seal(Stream::Readings, 5);
        let i = flip.index(env.len());
        env[i] ^= 1 << bit;
        prop_assert!(hub.ingest(&gw(), &env).ack().is_none());
        let mut prefixed = b"CGB1\x01\x01".to_vec();
        prefixed.extend_from_slice(&bytes);
        prop_assert!(hub.ingest(&gw(), &prefixed).ack().is_none());
        prop_assert!(f.lines().is_empty());
    }
}

#[test]
fn after_rotation_a_reopened_sink_writes_to_a_new_file_and_loses_nothing() {
    let f = Fixture::new();
    let hub = f.hub();
    assert!(matches!(
        hub.ingest(&gw(), &f.seal(Stream::Readings, 1)),
        Ingest::Accepted { .. }
    ));
    // logrotate: move the file aside, then SIGHUP.
    let rotated = f.sink_path().with_extension("jsonl.1");
    std::fs::rename(f.sink_path(), &rotated).unwrap();
    hub.reopen_sink().unwrap();
    assert!(matches!(
        hub.ingest(&gw(), &f.seal(Stream::Readings, 2)),
        Ingest::Accepted { .. }
    ));
    let seqs = |text: &str| -> Vec<u64> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let old = seqs(&std::fs::read_to_string(&rotated).unwrap());
    let new = seqs(&std::fs::read_to_string(f.sink_path()).unwrap());
    assert!(!old.is_empty() && old.iter().all(|s| *s == 1), "{old:?}");
    assert!(!new.is_empty() && new.iter().all(|s| *s == 2), "{new:?}");
    // Without the reopen, batch 2 would have gone to the rotated file.
}

/// Issue 9 item 4: two stores of one gateway (the second replacing a lost first) use the same
/// seqs under different incarnations; the hub writes both, and re-sends of each stay duplicates.
#[test]
fn the_same_seq_from_two_store_incarnations_is_two_batches() {
    let f = Fixture::new();
    let hub = f.hub();
    let replacement = Sealer::new(
        gw(),
        seal::load_signing_key(&f.keys.signing_key).unwrap(),
        seal::load_hub_public_key(&f.keys.hub_public_key).unwrap(),
        INC + 1,
    );
    let second = |seq| {
        replacement
            .seal(
                Stream::Readings,
                seq,
                1_700_000_000_000,
                &stamp(),
                &records(),
            )
            .unwrap()
            .bytes
    };
    for seq in 1..=3 {
        assert!(matches!(
            hub.ingest(&gw(), &f.seal(Stream::Readings, seq)),
            Ingest::Accepted { .. }
        ));
        assert!(matches!(
            hub.ingest(&gw(), &second(seq)),
            Ingest::Accepted { .. }
        ));
    }
    assert!(matches!(
        hub.ingest(&gw(), &second(2)),
        Ingest::Duplicate { .. }
    ));
    assert!(matches!(
        hub.ingest(&gw(), &f.seal(Stream::Readings, 2)),
        Ingest::Duplicate { .. }
    ));
    let lines = f.lines();
    assert_eq!(lines.len(), 6 * 4);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["incarnation"] == "5eed000000000002")
            .count(),
        12
    );
}

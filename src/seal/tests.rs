//! Seal/open tests across the module: round trips, tampering, truncation, each rejection
//! reason, and property tests over records and arbitrary bytes.

use ed25519_dalek::{Signer, SigningKey};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::reading::{
    AggFn, GatewayId, Quality, QualityReason, Record, Stream, Unit, Value, Window,
};

use super::vector::{
    gateway, hub_secret, opener, policy_hash, records, sealer, signing_key, stamp, INCARNATION,
};
use super::*;

fn rng() -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(7)
}

fn one_record() -> Vec<Record> {
    records().into_iter().take(1).collect()
}

fn small_envelope() -> Vec<u8> {
    sealer()
        .seal_with_rng(
            Stream::Alarms,
            9,
            1_000,
            &stamp(),
            &one_record(),
            &mut rng(),
        )
        .unwrap()
        .bytes
}

/// Replaces the signature of `env` with one by `key` over the (possibly edited) rest.
fn resign(env: &mut Vec<u8>, key: &SigningKey) {
    env.truncate(env.len() - SIGNATURE_LEN);
    let sig = key.sign(env);
    env.extend_from_slice(&sig.to_bytes());
}

fn reason(result: Result<OpenedBatch, OpenError>) -> &'static str {
    result.expect_err("envelope must be rejected").reason()
}

#[test]
fn round_trip_preserves_header_and_records() {
    let batch = sealer()
        .seal(Stream::Audit, 7, 1_700_000_000_123, &stamp(), &records())
        .unwrap();
    assert_eq!((batch.stream, batch.seq), (Stream::Audit, 7));
    let opened = opener().open(&batch.bytes).unwrap();
    assert_eq!(opened.records, records());
    assert_eq!(opened.header.gateway, gateway());
    assert_eq!(opened.header.stream, Stream::Audit);
    assert_eq!(opened.header.seq, 7);
    assert_eq!(opened.header.created_at_ms, 1_700_000_000_123);
    assert_eq!(opened.header.record_count, 5);
    assert_eq!(opened.header.policy_hash, policy_hash());
    assert_eq!(opened.header.purpose, Some(stamp().purpose));
    assert_eq!(peek_header(&batch.bytes).unwrap(), opened.header);
}

#[test]
fn empty_batch_round_trips() {
    let batch = sealer()
        .seal(Stream::Readings, 0, 0, &stamp(), &[])
        .unwrap();
    assert_eq!(
        opener().open(&batch.bytes).unwrap().records,
        Vec::<Record>::new()
    );
}

#[test]
fn every_single_byte_flip_is_rejected_with_a_sensible_reason() {
    let env = small_envelope();
    let gw_end = 7 + GATEWAY_LEN;
    let stream_at = gw_end;
    let purpose_len_at = stream_at + 1;
    let purpose_end = purpose_len_at + 1 + PURPOSE_LEN;
    let record_count_at = purpose_end + 8 + 8 + 8;
    let signer_id = record_count_at + 4 + 32;
    let header_len = signer_id + 8 + 8 + 32;
    let ct_len_at = header_len;
    for i in 0..env.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = env.clone();
            bad[i] ^= mask;
            let err = opener()
                .open(&bad)
                .expect_err("a flipped byte must not open");
            let r = err.reason();
            let ok = match i {
                0..=3 => r == "bad_magic",
                // 3 ^ 0x01 is version 2, which reads the rest of the header differently.
                4 => {
                    r == "unknown_version"
                        || err.is_parse_error()
                        || r == "unknown_signer_key"
                        || r == "bad_signature"
                }
                5 => r == "unknown_suite",
                6 => err.is_parse_error(),
                i if i < gw_end => r == "bad_gateway_id" || r == "unknown_gateway",
                i if i == stream_at => r == "unknown_stream" || r == "bad_signature",
                i if i == purpose_len_at => err.is_parse_error() || r == "bad_signature",
                i if i < purpose_end => r == "bad_purpose" || r == "bad_signature",
                i if (record_count_at..record_count_at + 4).contains(&i) => {
                    r == "too_many_records" || r == "bad_signature"
                }
                i if (signer_id..signer_id + 8).contains(&i) => r == "unknown_signer_key",
                i if (ct_len_at..ct_len_at + 4).contains(&i) => err.is_parse_error(),
                _ => r == "bad_signature",
            };
            assert!(ok, "byte {i} ^ {mask:#04x}: unexpected rejection {err:?}");
            assert!(peek_header(&bad).is_err() || !err.is_parse_error());
        }
    }
}

const GATEWAY_LEN: usize = super::vector::GATEWAY.len();
const PURPOSE_LEN: usize = super::vector::PURPOSE.len();

#[test]
fn truncation_at_every_length_fails_cleanly() {
    let env = small_envelope();
    for len in 0..env.len() {
        assert_eq!(
            opener().open(&env[..len]).unwrap_err(),
            OpenError::Truncated,
            "len {len}"
        );
        assert_eq!(
            peek_header(&env[..len]).unwrap_err(),
            OpenError::Truncated,
            "len {len}"
        );
    }
    let mut longer = env.clone();
    longer.push(0);
    assert_eq!(reason(opener().open(&longer)), "trailing_bytes");
}

#[test]
fn unknown_gateway_is_reported() {
    let other = GatewayId::new("gw-other").unwrap();
    let s = Sealer::new(
        other.clone(),
        signing_key(),
        hub_secret().public_key(),
        INCARNATION,
    );
    let env = s
        .seal(Stream::Readings, 1, 0, &stamp(), &one_record())
        .unwrap()
        .bytes;
    let err = opener().open(&env).unwrap_err();
    assert_eq!(err, OpenError::UnknownGateway(other));
    assert_eq!(err.reason(), "unknown_gateway");
}

#[test]
fn batch_signed_by_an_unregistered_key_is_rejected() {
    let intruder = SigningKey::from_bytes(&[0x77; 32]);
    let s = Sealer::new(
        gateway(),
        intruder.clone(),
        hub_secret().public_key(),
        INCARNATION,
    );
    let env = s
        .seal(Stream::Readings, 1, 0, &stamp(), &one_record())
        .unwrap()
        .bytes;
    assert_eq!(reason(opener().open(&env)), "unknown_signer_key");

    // Same header (naming the registered key id), signature by another key.
    let mut forged = small_envelope();
    resign(&mut forged, &intruder);
    assert_eq!(reason(opener().open(&forged)), "bad_signature");
}

#[test]
fn wrong_recipient_is_reported() {
    let other_hub = HubSecretKey::from_bytes(&[0x42; 32]);
    let s = Sealer::new(
        gateway(),
        signing_key(),
        other_hub.public_key(),
        INCARNATION,
    );
    let env = s
        .seal(Stream::Readings, 1, 0, &stamp(), &one_record())
        .unwrap()
        .bytes;
    let err = opener().open(&env).unwrap_err();
    assert_eq!(
        err,
        OpenError::WrongRecipient {
            key_id: other_hub.key_id()
        }
    );
    assert_eq!(err.reason(), "wrong_recipient");

    // Sealed to another key but claiming ours, correctly signed: decryption fails.
    let mut lying = env;
    let at = 7 + GATEWAY_LEN + 1 + 1 + PURPOSE_LEN + 8 + 8 + 8 + 4 + 32 + 8;
    lying[at..at + 8].copy_from_slice(&hub_secret().key_id());
    resign(&mut lying, &signing_key());
    assert_eq!(reason(opener().open(&lying)), "undecryptable");
}

#[test]
fn unknown_version_is_reported_even_when_signed() {
    let mut env = small_envelope();
    env[4] = 4;
    resign(&mut env, &signing_key());
    let err = opener().open(&env).unwrap_err();
    assert_eq!(err, OpenError::UnknownVersion(4));
    assert_eq!(err.reason(), "unknown_version");
    assert_eq!(peek_header(&env).unwrap_err(), OpenError::UnknownVersion(4));
}

#[test]
fn bad_plaintexts_are_reported_after_authentication() {
    let seal_raw = |count: u32, plaintext: &[u8]| {
        sealer()
            .seal_plaintext(
                Stream::Readings,
                1,
                0,
                &stamp(),
                count,
                plaintext,
                &mut rng(),
            )
            .unwrap()
            .bytes
    };
    assert_eq!(
        reason(opener().open(&seal_raw(0, b"not zstd"))),
        "decompress"
    );
    let not_records = zstd::bulk::compress(b"\x01\x02\x03", ZSTD_LEVEL).unwrap();
    assert_eq!(reason(opener().open(&seal_raw(1, &not_records))), "decode");
    let bomb = zstd::bulk::compress(&vec![0u8; MAX_PLAINTEXT_BYTES + 1], 1).unwrap();
    assert_eq!(
        reason(opener().open(&seal_raw(1, &bomb))),
        "decompressed_too_large"
    );

    let plain = bincode::serde::encode_to_vec(one_record(), bincode::config::standard()).unwrap();
    let compressed = zstd::bulk::compress(&plain, ZSTD_LEVEL).unwrap();
    assert_eq!(
        opener().open(&seal_raw(2, &compressed)).unwrap_err(),
        OpenError::CountMismatch {
            header: 2,
            actual: 1
        }
    );
    assert!(opener().open(&seal_raw(1, &compressed)).is_ok());
}

#[test]
fn reasons_are_snake_case_labels() {
    let errors = [
        OpenError::Truncated,
        OpenError::BadMagic,
        OpenError::UnknownVersion(9),
        OpenError::UnknownGateway(gateway()),
        OpenError::BadSignature,
        OpenError::Undecryptable,
        OpenError::CountMismatch {
            header: 1,
            actual: 2,
        },
    ];
    for e in errors {
        let r = e.reason();
        assert!(r.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{r}");
    }
}

#[test]
fn debug_output_never_shows_secret_key_bytes() {
    let seed_hex = hex::encode(signing_key().to_bytes());
    let hub_hex = hex::encode([0x20u8, 0x21, 0x22, 0x23]);
    for text in [
        format!("{:?}", sealer()),
        format!("{:?}", opener()),
        format!("{:?}", hub_secret()),
    ] {
        assert!(
            !text.contains(&seed_hex) && !text.contains(&hub_hex),
            "{text}"
        );
    }
    assert!(format!("{:?}", hub_secret()).contains(&hex::encode(hub_secret().key_id())));
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,40}", "[a-z0-9_-]{0,16}"]
}

fn arb_reason() -> impl Strategy<Value = QualityReason> {
    prop_oneof![
        Just(QualityReason::OutOfRange),
        Just(QualityReason::NotAvailable),
        Just(QualityReason::CounterBackwards),
        Just(QualityReason::CounterRollover),
        Just(QualityReason::NotFinite),
        Just(QualityReason::ReceiveTime),
        Just(QualityReason::ClockSkew),
    ]
}

fn arb_record() -> impl Strategy<Value = Record> {
    let value = prop_oneof![
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Float),
        any::<bool>().prop_map(Value::Bool),
        arb_text().prop_map(Value::Text),
    ];
    let quality = prop_oneof![
        Just(Quality::Good),
        arb_reason().prop_map(Quality::Uncertain),
        arb_reason().prop_map(Quality::Bad),
    ];
    (
        arb_text(),
        arb_text(),
        value,
        prop::sample::select(Unit::ALL.to_vec()),
        any::<i64>(),
        quality,
        prop::collection::vec(arb_text(), 0..3),
        prop::option::of(arb_window()),
        any::<u32>(),
    )
        .prop_map(
            |(subject, field, value, unit, at_ms, quality, tags, window, epoch)| Record {
                subject,
                field,
                value,
                unit,
                at_ms,
                quality,
                tags,
                window,
                epoch,
            },
        )
}

fn arb_window() -> impl Strategy<Value = Window> {
    let function = prop_oneof![
        Just(AggFn::Sum),
        Just(AggFn::Mean),
        Just(AggFn::Min),
        Just(AggFn::Max),
        Just(AggFn::Last),
        Just(AggFn::Delta),
    ];
    (
        function,
        any::<i64>(),
        any::<i64>(),
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(function, start_ms, end_ms, samples, devices, partial)| Window {
                function,
                start_ms,
                end_ms,
                samples,
                devices,
                partial,
            },
        )
}

proptest! {
    #[test]
    fn arbitrary_records_round_trip(
        records in prop::collection::vec(arb_record(), 0..12),
        seq in any::<u64>(),
        created in any::<i64>(),
    ) {
        let batch = sealer().seal(Stream::Readings, seq, created, &stamp(), &records).unwrap();
        let opened = opener().open(&batch.bytes).unwrap();
        // Compare encodings, so NaN payloads count as equal when bit-identical.
        let enc = |r: &Vec<Record>| bincode::serde::encode_to_vec(r, bincode::config::standard()).unwrap();
        prop_assert_eq!(enc(&opened.records), enc(&records));
        prop_assert_eq!(opened.header.seq, seq);
        prop_assert_eq!(opened.header.created_at_ms, created);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(opener().open(&bytes).is_err());
        let _ = peek_header(&bytes);
    }

    #[test]
    fn mutated_envelopes_never_panic_or_open(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut env = small_envelope();
        // One mask per position, so edits cannot cancel out.
        let edits: std::collections::BTreeMap<usize, u8> =
            edits.into_iter().map(|(at, mask)| (at.index(env.len()), mask)).collect();
        for (i, mask) in edits {
            env[i] ^= mask;
        }
        if truncate {
            env.truncate(cut.index(env.len()));
        }
        prop_assert!(opener().open(&env).is_err());
        let _ = peek_header(&env);
    }
}

/// Issue 9 item 15: a registered gateway's validly signed batch announcing 600,000 records is
/// refused before anything is decrypted or allocated for them.
#[test]
fn a_signed_batch_announcing_too_many_records_is_refused_before_decrypting() {
    let compressed = super::codec::amplified_plaintext(600_000);
    let seal_raw = |count: u32| {
        sealer()
            .seal_plaintext(
                Stream::Readings,
                1,
                0,
                &stamp(),
                count,
                &compressed,
                &mut rng(),
            )
            .unwrap()
            .bytes
    };
    let honest = seal_raw(600_000);
    assert!(honest.len() < 4_096, "{} bytes", honest.len());
    assert_eq!(reason(opener().open(&honest)), "too_many_records");
    assert_eq!(reason(opener().open(&seal_raw(4))), "count_mismatch");
    let too_many = vec![one_record()[0].clone(); MAX_RECORDS_PER_BATCH as usize + 1];
    assert!(matches!(
        sealer().seal(Stream::Readings, 1, 0, &stamp(), &too_many),
        Err(super::error::SealError::TooManyRecords(_))
    ));
}

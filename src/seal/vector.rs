//! The committed test vectors, and the fixed keys and records the other tests reuse.
//!
//! `testdata/vector-v3.txt` is what this code writes (envelope version 3). `testdata/vector-v1.txt`
//! and `testdata/vector-v2.txt` are frozen: version 1 envelopes (no incarnation) and version 2
//! envelopes (records without window and key epoch) are still read, and the tests
//! `vector_v1_still_opens_as_incarnation_0` and `vector_v2_still_opens_without_windows_or_epochs`
//! keep them readable. Both hold the four [`legacy_records`].
//!
//! The vector is rendered from the fixed inputs below; the test `vector_file_is_current` fails
//! when the committed file differs. To regenerate it after an intended format change:
//!
//! ```text
//! CITYGATE_REGEN_VECTORS=1 cargo test --lib seal::vector
//! ```
//!
//! A changed vector means every deployed hub must change too: bump the envelope version.

use ed25519_dalek::SigningKey;
use hpke::{Kem as _, Serializable};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use crate::reading::{
    AggFn, GatewayId, PurposeName, Quality, QualityReason, Record, Stream, Unit, Value, Window,
};

use super::key_types::HubKem;
use super::*;

pub(super) const GATEWAY: &str = "gw-test-01";
pub(super) const PURPOSE: &str = "test-purpose";
pub(super) const STREAM: Stream = Stream::Readings;
pub(super) const SEQ: u64 = 42;
pub(super) const INCARNATION: u64 = 0x5eed_c17e_9a7e_0001;
pub(super) const CREATED_AT_MS: i64 = 1_700_000_000_000;
/// Seed of the ChaCha20 RNG that supplies HPKE's ephemeral key material.
pub(super) const HPKE_RNG_SEED: u64 = 20_240_601;
const REGEN_ENV: &str = "CITYGATE_REGEN_VECTORS";
const SUBJECT: &str = "p-0123456789abcdef0123456789abcdef";
/// The pseudonym key epoch of the version 3 records.
const EPOCH: u32 = 3;

/// Ed25519 seed 00 01 02 … 1f.
pub(super) fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&std::array::from_fn(|i| i as u8))
}

/// X25519 secret 20 21 22 … 3f.
pub(super) fn hub_secret() -> HubSecretKey {
    HubSecretKey::from_bytes(&std::array::from_fn(|i| 0x20 + i as u8))
}

pub(super) fn policy_hash() -> [u8; 32] {
    Sha256::digest(b"citygate test policy v1").into()
}

/// The vector's purpose and policy hash.
pub(super) fn stamp() -> PolicyStamp {
    PolicyStamp::new(
        PurposeName::new(PURPOSE).expect("valid test purpose"),
        policy_hash(),
    )
}

pub(super) fn gateway() -> GatewayId {
    GatewayId::new(GATEWAY).expect("valid test gateway id")
}

pub(super) fn sealer() -> Sealer {
    Sealer::new(
        gateway(),
        signing_key(),
        hub_secret().public_key(),
        INCARNATION,
    )
}

pub(super) fn opener() -> Opener {
    let mut opener = Opener::new(hub_secret());
    opener.register(gateway(), signing_key().verifying_key());
    opener
}

fn record(field: &str, value: Value, unit: Unit, at_ms: i64, quality: Quality) -> Record {
    Record {
        subject: SUBJECT.to_owned(),
        field: field.to_owned(),
        value,
        unit,
        at_ms,
        quality,
        tags: Vec::new(),
        window: None,
        epoch: 0,
    }
}

/// What the frozen version 1 and 2 vectors hold, as they open today: one record per `Value`
/// variant; Good, Uncertain and Bad quality; one tagged record; no window, epoch 0.
pub(super) fn legacy_records() -> Vec<Record> {
    let mut text = record(
        "meter_serial",
        Value::Text("p-fedcba9876543210fedcba9876543210".to_owned()),
        Unit::One,
        1_699_999_999_000,
        Quality::Good,
    );
    text.tags = vec!["emergency".to_owned()];
    vec![
        record(
            "energy_import",
            Value::Int(123_456_789),
            Unit::WattHour,
            1_699_999_990_000,
            Quality::Good,
        ),
        record(
            "voltage_l1",
            Value::Float(230.5),
            Unit::Volt,
            1_699_999_990_000,
            Quality::Uncertain(QualityReason::OutOfRange),
        ),
        record(
            "tamper",
            Value::Bool(true),
            Unit::One,
            1_699_999_995_000,
            Quality::Bad(QualityReason::NotAvailable),
        ),
        text,
    ]
}

/// The version 3 vector: the legacy records under key epoch 3, and an hourly energy delta
/// (an aggregate with its window).
pub(super) fn records() -> Vec<Record> {
    let mut records = legacy_records();
    let mut delta = record(
        "energy_import",
        Value::Int(4_200),
        Unit::WattHour,
        1_699_995_600_000,
        Quality::Good,
    );
    delta.window = Some(Window {
        function: AggFn::Delta,
        start_ms: 1_699_995_600_000,
        end_ms: 1_699_999_200_000,
        samples: 360,
        devices: 1,
        partial: false,
    });
    records.push(delta);
    for r in &mut records {
        r.epoch = EPOCH;
    }
    records
}

pub(super) fn seal_vector() -> SealedBatch {
    sealer()
        .seal_with_rng(
            STREAM,
            SEQ,
            CREATED_AT_MS,
            &stamp(),
            &records(),
            &mut ChaCha20Rng::seed_from_u64(HPKE_RNG_SEED),
        )
        .expect("vector seals")
}

fn hpke_ephemeral_ikm() -> [u8; 32] {
    let mut ikm = [0u8; 32];
    ChaCha20Rng::seed_from_u64(HPKE_RNG_SEED).fill_bytes(&mut ikm);
    ikm
}

fn wrapped_hex(bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    let mut out = String::new();
    for chunk in hex.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("hex is ASCII"));
        out.push('\n');
    }
    out
}

fn render() -> String {
    let batch = seal_vector();
    let signing = signing_key();
    let hub = hub_secret();
    let plaintext = bincode::serde::encode_to_vec(records(), bincode::config::standard())
        .expect("records encode");
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k}: {v}\n"));
    line(
        "format",
        "citygate sealed batch, envelope version 3, suite 1".to_owned(),
    );
    line("gateway", GATEWAY.to_owned());
    line("gateway_signing_seed", hex::encode(signing.to_bytes()));
    line(
        "gateway_verifying_key",
        hex::encode(signing.verifying_key().as_bytes()),
    );
    line(
        "signer_key_id",
        hex::encode(key_id(signing.verifying_key().as_bytes())),
    );
    line("hub_secret_key", hex::encode(hub.inner().to_bytes()));
    line("hub_public_key", hex::encode(hub.public_key().to_bytes()));
    line("recipient_key_id", hex::encode(hub.key_id()));
    line(
        "hpke_info",
        format!(
            "{:?} ({})",
            String::from_utf8_lossy(HPKE_INFO),
            hex::encode(HPKE_INFO)
        ),
    );
    line("hpke_ephemeral_ikm", hex::encode(hpke_ephemeral_ikm()));
    line("stream", format!("{STREAM} (code {})", STREAM.code()));
    line("purpose", PURPOSE.to_owned());
    line(
        "incarnation",
        format!("{INCARNATION} (0x{INCARNATION:016x})"),
    );
    line("seq", SEQ.to_string());
    line("created_at_ms", CREATED_AT_MS.to_string());
    line(
        "policy_hash",
        format!(
            "{} (SHA-256 of \"citygate test policy v1\")",
            hex::encode(policy_hash())
        ),
    );
    line("record_count", records().len().to_string());
    for (i, r) in records().iter().enumerate() {
        line(
            &format!("record[{i}]"),
            serde_json::to_string(r).expect("record serialises"),
        );
    }
    line("plaintext_bincode_len", plaintext.len().to_string());
    line("envelope_len", batch.bytes.len().to_string());
    let mut out = String::from(
        "# citygate sealed-batch test vector v3\n\
         #\n\
         # Inputs: the keys, header fields and records below (records as serde JSON, one per\n\
         # line). HPKE's ephemeral key is DeriveKeyPair(hpke_ephemeral_ikm) (RFC 9180 7.1.3),\n\
         # the ikm being the first 32 bytes of rand_chacha's ChaCha20Rng::seed_from_u64(20240601).\n\
         # A hub implementation must open `envelope` with hub_secret_key and the registered\n\
         # gateway_verifying_key and get exactly these header fields and records;\n\
         # `plaintext_bincode` is the decompressed plaintext, to test a bincode decoder alone.\n\
         # Regenerate (after an intended format change only):\n\
         #   CITYGATE_REGEN_VECTORS=1 cargo test --lib seal::vector\n\
         \n",
    );
    out.push_str(&s);
    out.push_str("\nplaintext_bincode:\n");
    out.push_str(&wrapped_hex(&plaintext));
    out.push_str("\nenvelope:\n");
    out.push_str(&wrapped_hex(&batch.bytes));
    out
}

fn testdata(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/seal/testdata")
        .join(name)
}

fn vector_path() -> std::path::PathBuf {
    testdata("vector-v3.txt")
}

/// The hex block following a `name:` line, up to the next blank line.
fn hex_block(text: &str, name: &str) -> Vec<u8> {
    let start = format!("\n{name}:\n");
    let from = text.find(&start).expect("block present") + start.len();
    let hex: String = text[from..]
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .collect();
    hex::decode(hex).expect("block is hex")
}

fn committed() -> String {
    std::fs::read_to_string(vector_path()).expect("testdata/vector-v3.txt is committed")
}

#[test]
fn vector_file_is_current() {
    let rendered = render();
    if std::env::var(REGEN_ENV).as_deref() == Ok("1") {
        std::fs::write(vector_path(), &rendered).expect("write vector file");
        return;
    }
    assert!(
        committed() == rendered,
        "src/seal/testdata/vector-v3.txt is stale; if the format change is intended, run \
         {REGEN_ENV}=1 cargo test --lib seal::vector and bump the envelope version"
    );
}

#[test]
fn vector_envelope_opens_to_expected_batch() {
    let envelope = hex_block(&committed(), "envelope");
    let opened = opener().open(&envelope).unwrap();
    assert_eq!(opened.records, records());
    let h = &opened.header;
    assert_eq!((h.version, h.suite), (3, 1));
    assert_eq!(h.gateway, gateway());
    assert_eq!(h.incarnation, INCARNATION);
    assert_eq!(
        (h.stream, h.seq, h.created_at_ms),
        (STREAM, SEQ, CREATED_AT_MS)
    );
    assert_eq!(h.record_count, 5);
    assert_eq!(h.purpose.as_ref().map(PurposeName::as_str), Some(PURPOSE));
    assert_eq!(h.policy_hash, policy_hash());
    assert_eq!(
        h.signer_key_id,
        key_id(signing_key().verifying_key().as_bytes())
    );
    assert_eq!(h.recipient_key_id, hub_secret().key_id());
    assert_eq!(peek_header(&envelope).unwrap(), *h);
}

/// Version 1 envelopes (sealed before incarnations existed) still open, as incarnation 0.
#[test]
fn vector_v1_still_opens_as_incarnation_0() {
    let text = std::fs::read_to_string(testdata("vector-v1.txt")).expect("committed");
    let envelope = hex_block(&text, "envelope");
    let opened = opener().open(&envelope).unwrap();
    assert_eq!(opened.records, legacy_records());
    let h = &opened.header;
    assert_eq!((h.version, h.incarnation, h.seq), (1, 0, SEQ));
    assert_eq!(h.stream, STREAM);
}

/// Version 2 envelopes (records without window and key epoch) still open: their records
/// decode through the frozen legacy layout as `window: None, epoch: 0` (issue 11 items 2 and 9).
#[test]
fn vector_v2_still_opens_without_windows_or_epochs() {
    let text = std::fs::read_to_string(testdata("vector-v2.txt")).expect("committed");
    let envelope = hex_block(&text, "envelope");
    let opened = opener().open(&envelope).unwrap();
    assert_eq!(opened.records, legacy_records());
    let h = &opened.header;
    assert_eq!((h.version, h.incarnation, h.seq), (2, INCARNATION, SEQ));
    assert_eq!(
        (h.stream, h.record_count, h.purpose.clone()),
        (STREAM, 4, None)
    );
    assert_eq!(h.policy_hash, policy_hash());
}

#[test]
fn resealing_vector_inputs_reproduces_the_bytes() {
    let envelope = hex_block(&committed(), "envelope");
    assert_eq!(seal_vector().bytes, envelope);
    assert_eq!(seal_vector().bytes, seal_vector().bytes);
}

#[test]
fn vector_plaintext_and_ephemeral_key_are_as_documented() {
    let text = committed();
    let plaintext = hex_block(&text, "plaintext_bincode");
    let (decoded, _): (Vec<Record>, usize) =
        bincode::serde::decode_from_slice(&plaintext, bincode::config::standard()).unwrap();
    assert_eq!(decoded, records());
    let (_, ephemeral_public) = HubKem::derive_keypair(&hpke_ephemeral_ikm());
    let header = peek_header(&hex_block(&text, "envelope")).unwrap();
    assert_eq!(
        header.encapped_key,
        <[u8; 32]>::from(ephemeral_public.to_bytes())
    );
}

#[test]
fn bincode_encoding_matches_the_documented_example() {
    let plain =
        bincode::serde::encode_to_vec(&records()[..2], bincode::config::standard()).unwrap();
    let mut expected = vec![0x02, 0x22];
    expected.extend_from_slice(SUBJECT.as_bytes());
    expected.push(0x0d);
    expected.extend_from_slice(b"energy_import");
    expected.extend_from_slice(&[0x00, 0xfc, 0x2a, 0x9a, 0xb7, 0x0e]);
    expected.extend_from_slice(&[0x02, b'W', b'h']);
    expected.extend_from_slice(&[0xfd, 0xe0, 0x81, 0xca, 0x9f, 0x17, 0x03, 0x00, 0x00]);
    expected.extend_from_slice(&[0x00, 0x00]);
    expected.extend_from_slice(&[0x00, 0x03]);
    expected.push(0x22);
    expected.extend_from_slice(SUBJECT.as_bytes());
    expected.push(0x0a);
    expected.extend_from_slice(b"voltage_l1");
    expected.extend_from_slice(&[0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0xd0, 0x6c, 0x40]);
    expected.extend_from_slice(&[0x01, b'V']);
    expected.extend_from_slice(&[0xfd, 0xe0, 0x81, 0xca, 0x9f, 0x17, 0x03, 0x00, 0x00]);
    expected.extend_from_slice(&[0x01, 0x00, 0x00]);
    expected.extend_from_slice(&[0x00, 0x03]);
    assert_eq!(hex::encode(plain), hex::encode(expected));
    // The aggregate: the same framing, then Some(window) and the epoch.
    let delta = &records()[4];
    let plain = bincode::serde::encode_to_vec(delta, bincode::config::standard()).unwrap();
    let mut tail = vec![0x01, 0x05];
    tail.extend_from_slice(&[0xfd, 0x00, 0x89, 0x44, 0x9f, 0x17, 0x03, 0x00, 0x00]);
    tail.extend_from_slice(&[0xfd, 0x00, 0x66, 0xb2, 0x9f, 0x17, 0x03, 0x00, 0x00]);
    tail.extend_from_slice(&[0xfb, 0x68, 0x01, 0x01, 0x00, 0x03]);
    assert_eq!(
        hex::encode(&plain[plain.len() - tail.len()..]),
        hex::encode(tail)
    );
}

//! Sealed batches: the envelope that carries records from a gateway to the hub.
//!
//! A batch of [`Record`](crate::reading::Record)s is encoded, compressed, encrypted to the hub's
//! public key with HPKE and signed with the gateway's Ed25519 key, in that order, **before** it is
//! stored: the gateway cannot read its own backlog, so a stolen box or SD card leaks nothing, and
//! the hub accepts only what a registered gateway signed. This module is the only codec of the
//! format; this documentation is its specification, written so that a hub in another language
//! (Go, Java, Python) can implement it. The committed test vector (below) checks an
//! implementation end to end.
//!
//! Files: `envelope.rs` (header and framing, no crypto; [`peek_header`]), `sealer.rs`
//! ([`Sealer`], gateway side), `opener.rs` ([`Opener`], hub side), `codec.rs` (the plaintext:
//! bincode + zstd under hard limits), `key_types.rs` (hub keys, pseudonym key, key ids),
//! `keys.rs` (key files), `roles.rs` (key roles, fingerprints), `handover.rs` (public-key
//! export and import between boxes), `error.rs`.
//!
//! # Envelope, version 3
//!
//! All integers in the envelope are **big-endian**. `G` is the gateway id length, `P` the purpose
//! name length, `N` the ciphertext length.
//!
//! ```text
//! offset    size  field             value
//! 0         4     magic             "CGB1" = 43 47 42 31
//! 4         1     version           3
//! 5         1     suite             1 (X25519-HKDF-SHA256 / ChaCha20-Poly1305 / Ed25519)
//! 6         1     gateway_len       G, 1..=64
//! 7         G     gateway           gateway id, UTF-8; only ASCII letters, digits, '-', '_', '.'
//! 7+G       1     stream            0 readings, 1 alarms, 2 audit, 3..=9 further purpose flows
//! 8+G       1     purpose_len       P, 1..=64
//! 9+G       P     purpose           purpose name, same character set as the gateway id
//! 9+G+P     8     incarnation       u64, random id of the gateway store the batch was sealed for
//! 17+G+P    8     seq               u64, per-stream sequence number within the incarnation
//! 25+G+P    8     created_at        i64, ms since the Unix epoch, UTC
//! 33+G+P    4     record_count      u32, number of records in the plaintext, at most 50,000
//! 37+G+P    32    policy_hash       hash of the policy the records obey, under `purpose`
//! 69+G+P    8     signer_key_id     key id of the gateway's Ed25519 public key
//! 77+G+P    8     recipient_key_id  key id of the hub's X25519 public key
//! 85+G+P    32    enc               HPKE encapsulated key (sender's ephemeral X25519 public key)
//!           ----  header ends here: H = 117 + G + P bytes
//! H         4     ct_len            u32, N
//! H+4       N     ciphertext        HPKE/AEAD ciphertext, 16-byte Poly1305 tag included (N >= 16)
//! H+4+N     64    signature         Ed25519 signature over bytes [0, H+4+N)
//!           ----  total length 185 + G + P + N; nothing may follow the signature
//! ```
//!
//! (`purpose`, `policy_hash`) name the policy the batch was made under: one per batch. The hub
//! accepts a batch only if its gateway is approved for exactly that pair. Records the gateway
//! raises about itself go out on the audit stream under the built-in stamp: purpose
//! `citygate-gateway`, hash SHA-256 of the 27 ASCII bytes `citygate/v1 gateway records`
//! ([`PolicyStamp::gateway`]).
//!
//! The **header** is every byte from `magic` through `enc` inclusive (offsets `0..H`). Those exact
//! bytes, as received, are the AEAD associated data; the signature covers header ‖ `ct_len` ‖
//! ciphertext. Unknown versions, suites or stream codes are rejected, as are a gateway id or
//! purpose name that is empty, longer than 64 bytes or has other characters, a `record_count`
//! above 50,000
//! ([`MAX_RECORDS_PER_BATCH`], checked before any key is used), an envelope shorter than
//! `ct_len` says, and bytes after the signature.
//!
//! A batch is identified by (gateway, stream, incarnation, seq). The **incarnation** is made at
//! random when the gateway's store is created and never changes for that store; a store that is
//! lost or replaced starts a new incarnation and counts its seqs from 1 again. Sequence numbers
//! therefore never depend on the gateway's clock, and a new store can never collide with what an
//! old one sent.
//!
//! **Version 2** (still read; no longer written) has no `purpose_len` and `purpose`: incarnation
//! at 8+G, every later field P + 1 bytes earlier, H = 116 + G; its records lack `window` and
//! `epoch` (see [Plaintext](#plaintext)). **Version 1** (still read; no longer written) is the
//! version 2 layout without `incarnation`: `seq` at 8+G, every later field 8 bytes earlier,
//! H = 108 + G. Openers treat it as incarnation 0.
//!
//! A **key id** is the first 8 bytes of SHA-256 over the raw 32-byte public key: the RFC 8032
//! encoding of the gateway's Ed25519 key for `signer_key_id`, the RFC 7748 encoding of the hub's
//! X25519 key for `recipient_key_id` ([`key_id`]).
//!
//! # Cryptography, suite 1
//!
//! - **Encryption**: HPKE, RFC 9180, base mode (`mode_base` = 0x00, no PSK, no sender auth) with
//!   KEM `DHKEM(X25519, HKDF-SHA256)` = 0x0020, KDF `HKDF-SHA256` = 0x0001, AEAD
//!   `ChaCha20-Poly1305` = 0x0003. `info` is the 17 ASCII bytes `citygate/v1 batch` (no
//!   terminator; [`HPKE_INFO`]). The gateway runs `SetupBaseS(pkR, info)` to get `enc` and a
//!   context, writes `enc` into the header, then `ct = context.Seal(aad = header, pt)` as the
//!   context's first and only message. That is exactly RFC 9180 single-shot
//!   `SealBase(pkR, info, aad, pt)`, so the hub runs `OpenBase(enc, skR, info, aad = header, ct)`.
//!   X25519 keys are raw 32 bytes; secret keys are clamped on use (RFC 7748).
//! - **Signature**: Ed25519 (RFC 8032, pure Ed25519: no context, no prehash) by the gateway's key
//!   over every byte before the signature. Verify strictly: reject non-canonical `S` and
//!   small-order public keys or `R` (ed25519-dalek `verify_strict`; Go's `crypto/ed25519` plus a
//!   small-order check, or libsodium).
//! - Sign-then-check order for openers: authenticate the origin before decrypting anything.
//!
//! # Plaintext
//!
//! `pt = zstd(bincode(records))` where `records` is a `Vec<Record>` encoded with bincode 2.0.1
//! `config::standard()` through serde (`bincode::serde::encode_to_vec(&records,
//! bincode::config::standard())`), compressed as one zstd frame (RFC 8878) at level 3
//! ([`ZSTD_LEVEL`]). Openers **must** cap the decompressed size at 64 MiB
//! ([`MAX_PLAINTEXT_BYTES`]) while decompressing (do not trust the frame's content size) and
//! reject bigger plaintexts; the sealer never produces one. After decoding, no bytes may remain
//! and the record count must equal the header's `record_count`.
//!
//! bincode's standard config is little-endian with variable-length integers. Building blocks:
//!
//! ```text
//! varint(u)   u <= 250: 1 byte u
//!             u <= 0xffff: fb, then u as u16 little-endian
//!             u <= 0xffff_ffff: fc, then u as u32 little-endian
//!             otherwise: fd, then u as u64 little-endian        (writers use the shortest form)
//! i64         zigzag then varint: z = (i << 1) ^ (i >> 63); 0→0, -1→1, 1→2, -2→3
//! f64         8 bytes, IEEE 754 binary64, little-endian (not a varint)
//! bool        1 byte, 00 or 01 (anything else is rejected)
//! string      varint(byte length) ‖ UTF-8 bytes
//! sequence    varint(element count) ‖ elements
//! enum        varint(variant index) ‖ payload (none for unit variants)
//! struct      fields in declaration order, no names, no tags
//! ```
//!
//! The plaintext is then:
//!
//! ```text
//! records  = varint(count) ‖ record × count
//! record   = subject: string        keyed pseudonym, "p-" + 32 hex digits, or a plain id
//!            field:   string        canonical field name, e.g. "energy_import"
//!            value:   Value
//!            unit:    string        the unit's symbol (below)
//!            at_ms:   i64           ms since the Unix epoch, UTC
//!            quality: Quality
//!            tags:    sequence of string
//!            window:  0 (none) | 1 Window   set on aggregates; at_ms is then the window start
//!            epoch:   varint (u32)          pseudonym key epoch; 0 = before key epochs
//! Window   = function:  AggFn
//!            start_ms:  i64                 inclusive, ms since the Unix epoch, UTC
//!            end_ms:    i64                 exclusive
//!            samples:   varint (u32)        readings the aggregate covers
//!            devices:   varint (u32)        distinct devices that contributed
//!            partial:   bool                the window was not fully covered
//! AggFn    = 0 sum | 1 mean | 2 min | 3 max | 4 last | 5 delta
//! Value    = 0 Int(i64) | 1 Float(f64) | 2 Bool(bool) | 3 Text(string)
//! Quality  = 0 Good | 1 Uncertain(QualityReason) | 2 Bad(QualityReason)
//! QualityReason = 0 out_of_range | 1 not_available | 2 counter_backwards
//!               | 3 counter_rollover | 4 not_finite | 5 receive_time | 6 clock_skew
//!               | 7 spike | 8 frozen | 9 counter_reset
//! unit symbols: W Wh var varh VA V A Hz m3 m3/h degC % Pa s 1
//! ```
//!
//! Versions 1 and 2 encode `record` without its last two fields (it ends at `tags`); openers
//! read them as `window` none and `epoch` 0.
//!
//! Worked example, the first two records of the test vector (checked by a unit test):
//!
//! ```text
//! 02                               2 records
//! 22 "p-0123456789abcdef…cdef"     subject, 34 bytes
//! 0d "energy_import"               field
//! 00 fc 2a 9a b7 0e                Int(123456789): zigzag 246913578 = 0x0eb79a2a → fc + u32 LE
//! 02 "Wh"                          unit
//! fd e0 81 ca 9f 17 03 00 00       at_ms 1699999990000: zigzag 3399999980000 → fd + u64 LE
//! 00                               Good
//! 00                               no tags
//! 00                               no window
//! 03                               epoch 3
//! 22 "p-0123456789abcdef…cdef"     subject
//! 0a "voltage_l1"                  field
//! 01 00 00 00 00 00 d0 6c 40       Float(230.5)
//! 01 "V"                           unit
//! fd e0 81 ca 9f 17 03 00 00       at_ms
//! 01 00                            Uncertain(out_of_range)
//! 00                               no tags
//! 00                               no window
//! 03                               epoch 3
//! ```
//!
//! and the tail of the fifth, an hourly energy delta:
//!
//! ```text
//! 01 05                            Some(window), delta
//! fd 00 89 44 9f 17 03 00 00       start_ms 1699995600000
//! fd 00 66 b2 9f 17 03 00 00       end_ms 1699999200000
//! fb 68 01                         360 samples
//! 01                               1 device
//! 00                               not partial
//! 03                               epoch 3
//! ```
//!
//! # Opening
//!
//! [`Opener::open`] checks, in order, stopping at the first failure ([`OpenError::reason`] in
//! parentheses): parse: magic (`bad_magic`), version (`unknown_version`), suite (`unknown_suite`),
//! gateway id (`bad_gateway_id`), stream (`unknown_stream`), purpose name (`bad_purpose`), record
//! count ceiling
//! (`too_many_records`), lengths (`truncated`, `trailing_bytes`) → the gateway is registered (`unknown_gateway`) → `signer_key_id` is its
//! registered key's (`unknown_signer_key`) → Ed25519 strict verification (`bad_signature`) →
//! `recipient_key_id` is the hub's (`wrong_recipient`) → HPKE open (`undecryptable`) → capped
//! zstd (`decompress`, `decompressed_too_large`) → the plaintext's count prefix equals
//! `record_count` (`count_mismatch`, checked before any record is decoded) → bincode (`decode`).
//! Opening does not de-duplicate; the hub does, on (gateway, stream, incarnation, seq).
//! [`peek_header`] runs only the parse step, for the store and the uplink, which hold no keys.
//!
//! # Test vector
//!
//! `src/seal/testdata/vector-v3.txt` holds one envelope with everything needed to open it:
//! Ed25519 seed `00 01 … 1f`, hub X25519 secret `20 21 … 3f`, gateway `gw-test-01`, stream
//! readings, purpose `test-purpose`, incarnation `5eedc17e9a7e0001`, seq 42, created_at
//! 1700000000000, policy hash SHA-256("citygate test policy v1"),
//! and five records covering every `Value` variant (Int, Float, Bool, Text), Good, Uncertain
//! and Bad quality (one tagged `emergency`), key epoch 3 and one aggregate with its window, each
//! as JSON; the bincode plaintext; and the
//! envelope, as hex wrapped at 64 characters. HPKE's ephemeral key comes from
//! `rand_chacha::ChaCha20Rng::seed_from_u64(20240601)` (its first 32 bytes, recorded as
//! `hpke_ephemeral_ikm`, are the `DeriveKeyPair` input). Tests check that the envelope opens to
//! exactly those records and header and that re-sealing reproduces it byte for byte. After an
//! intended format change, regenerate it with
//! `CITYGATE_REGEN_VECTORS=1 cargo test --lib seal::vector` (and bump the version).
//! `vector-v1.txt` (version 1, no incarnation) and `vector-v2.txt` (version 2, records without
//! window and epoch) hold the first four records as those versions wrote them, kept so that
//! both stay readable.
//!
//! # Versioning
//!
//! Any change to the layout, the plaintext encoding or the HPKE `info` is a new `version`; a new
//! algorithm set is a new `suite` (suite 2 is reserved for the GM suite: SM2, SM3, SM4).
//! Readers reject what they do not know rather than guess.

mod codec;
mod envelope;
mod error;
pub mod handover;
mod key_types;
pub mod keys;
mod opener;
pub mod roles;
mod sealer;
mod stamp;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod vector;

pub(crate) use envelope::SealedBatch;
pub use envelope::MAX_RECORDS_PER_BATCH;
pub use key_types::{key_id, HubPublicKey, HubSecretKey, PseudonymKey};
pub(crate) use keys::{
    load_hub_ack_signing_key, load_hub_secret_key, load_verifying_key, KeyError,
};
pub use opener::{OpenedBatch, Opener};
pub use sealer::Sealer;
pub use stamp::{PolicyStamp, GATEWAY_POLICY_CONSTANT, GATEWAY_PURPOSE};

// What the unit tests of `seal` and `hub` reach through the module root.
#[cfg(test)]
pub(crate) use codec::{MAX_PLAINTEXT_BYTES, ZSTD_LEVEL};
#[cfg(test)]
pub(crate) use envelope::{peek_header, SIGNATURE_LEN};
#[cfg(test)]
pub(crate) use error::OpenError;
#[cfg(test)]
pub(crate) use keys::{generate, load_hub_public_key, load_signing_key, GeneratedKeys};

/// The HPKE `info` string of suite 1.
pub(crate) const HPKE_INFO: &[u8] = b"citygate/v1 batch";

/// HPKE AEAD of suite 1: ChaCha20-Poly1305, RFC 9180 AEAD id 0x0003.
type HpkeAead = hpke::aead::ChaCha20Poly1305;
/// HPKE KDF of suite 1: HKDF-SHA256, RFC 9180 KDF id 0x0001.
type HpkeKdf = hpke::kdf::HkdfSha256;

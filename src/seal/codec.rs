//! The plaintext codec: `Vec<Record>` ⇄ `zstd(bincode 2 standard config)`.
//!
//! Sealing encodes with `bincode::serde::encode_to_vec(records, bincode::config::standard())`
//! and compresses the result as one zstd frame at [`ZSTD_LEVEL`]. Opening reverses it under hard
//! limits, because the plaintext is only as trustworthy as the gateway that signed it: the zstd
//! stream is decompressed through a reader capped at [`MAX_PLAINTEXT_BYTES`] (a decompression
//! bomb stops there instead of exhausting memory), and bincode decodes with the same limit so no
//! length prefix can make it allocate more. Trailing bytes after the record list are rejected.
//! The sealer refuses batches that encode to more than the cap, so every batch it produces can
//! be opened.

use std::io::Read;

use serde::Deserialize;

use crate::reading::{Quality, Record, Unit, Value};

use super::envelope::VERSION;
use super::error::{OpenError, SealError};

/// zstd compression level used by the sealer (zstd's own default).
pub(crate) const ZSTD_LEVEL: i32 = 3;

/// Hard cap on the decompressed plaintext of one batch: 64 MiB.
pub(crate) const MAX_PLAINTEXT_BYTES: usize = 64 * 1024 * 1024;

/// Encodes and compresses records into the plaintext that gets encrypted. One is kept for
/// every batch a sealer seals, with its zstd compression context: a fresh context per batch
/// allocates (and frees) about a megabyte of match tables each time, which glibc then keeps
/// resident in every allocator arena a sealing thread has used. The output does not depend on
/// the context's history (the committed test vector checks it byte for byte).
pub(crate) struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
}

impl Encoder {
    pub(crate) fn new() -> Result<Self, SealError> {
        Ok(Self {
            zstd: zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(SealError::Compress)?,
        })
    }

    pub(crate) fn encode(&mut self, records: &[Record]) -> Result<Vec<u8>, SealError> {
        let encoded = bincode::serde::encode_to_vec(records, bincode::config::standard())?;
        if encoded.len() > MAX_PLAINTEXT_BYTES {
            return Err(SealError::TooLarge {
                size: encoded.len(),
                limit: MAX_PLAINTEXT_BYTES,
            });
        }
        self.zstd.compress(&encoded).map_err(SealError::Compress)
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("zstd_level", &ZSTD_LEVEL)
            .finish()
    }
}

/// The record layout of envelope versions 1 and 2, frozen: no window, no key epoch. Batches
/// sealed before version 3 still open through it.
#[derive(Deserialize)]
struct LegacyRecord {
    subject: String,
    field: String,
    value: Value,
    unit: Unit,
    at_ms: i64,
    quality: Quality,
    tags: Vec<String>,
}

impl From<LegacyRecord> for Record {
    fn from(r: LegacyRecord) -> Record {
        Record {
            subject: r.subject,
            field: r.field,
            value: r.value,
            unit: r.unit,
            at_ms: r.at_ms,
            quality: r.quality,
            tags: r.tags,
            window: None,
            epoch: 0,
        }
    }
}

/// Decompresses (capped) and decodes a decrypted plaintext that must hold `expected` records,
/// in the record layout of envelope `version` (versions 1 and 2 decode as [`LegacyRecord`]).
/// The count prefix is checked against `expected` before any record is decoded, so a small
/// plaintext announcing millions of records allocates nothing for them.
pub(crate) fn decode_records(
    compressed: &[u8],
    expected: u32,
    version: u8,
) -> Result<Vec<Record>, OpenError> {
    let plain = decompress_capped(compressed)?;
    let config = bincode::config::standard().with_limit::<MAX_PLAINTEXT_BYTES>();
    let (count, _): (u64, usize) =
        bincode::decode_from_slice(&plain, config).map_err(|e| OpenError::Decode(e.to_string()))?;
    if count != u64::from(expected) {
        return Err(OpenError::CountMismatch {
            header: expected,
            actual: usize::try_from(count).unwrap_or(usize::MAX),
        });
    }
    let decoded = if version < VERSION {
        bincode::serde::decode_from_slice::<Vec<LegacyRecord>, _>(&plain, config)
            .map(|(legacy, used)| (legacy.into_iter().map(Record::from).collect(), used))
    } else {
        bincode::serde::decode_from_slice::<Vec<Record>, _>(&plain, config)
    };
    let (records, used) = decoded.map_err(|e| OpenError::Decode(e.to_string()))?;
    if used != plain.len() {
        return Err(OpenError::Decode(format!(
            "{} trailing bytes after the records",
            plain.len().saturating_sub(used)
        )));
    }
    Ok(records)
}

fn decompress_capped(compressed: &[u8]) -> Result<Vec<u8>, OpenError> {
    let decoder =
        zstd::stream::read::Decoder::with_buffer(compressed).map_err(|_| OpenError::Decompress)?;
    let cap = u64::try_from(MAX_PLAINTEXT_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut out = Vec::new();
    decoder
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|_| OpenError::Decompress)?;
    if out.len() > MAX_PLAINTEXT_BYTES {
        return Err(OpenError::DecompressedTooLarge {
            limit: MAX_PLAINTEXT_BYTES,
        });
    }
    Ok(out)
}

/// The compressed plaintext of `n` empty records: a few hundred bytes that decode to as many
/// records as asked (issue 9 item 15's amplification payload).
#[cfg(test)]
pub(crate) fn amplified_plaintext(n: usize) -> Vec<u8> {
    let empty = Record {
        subject: String::new(),
        field: String::new(),
        value: crate::reading::Value::Bool(false),
        unit: crate::reading::Unit::One,
        at_ms: 0,
        quality: crate::reading::Quality::Good,
        tags: Vec::new(),
        window: None,
        epoch: 0,
    };
    let plain = bincode::serde::encode_to_vec(vec![empty; n], bincode::config::standard())
        .expect("records encode");
    zstd::bulk::compress(&plain, ZSTD_LEVEL).expect("zstd compresses")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompression_is_capped() {
        // 65 MiB of zeros compresses to a few KiB: a small bomb.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_PLAINTEXT_BYTES + (1 << 20)], 1).unwrap();
        assert!(bomb.len() < 64 * 1024);
        assert_eq!(
            decode_records(&bomb, 0, VERSION),
            Err(OpenError::DecompressedTooLarge {
                limit: MAX_PLAINTEXT_BYTES
            })
        );
    }

    #[test]
    fn garbage_and_trailing_bytes_are_rejected() {
        assert_eq!(
            decode_records(b"not zstd", 0, VERSION),
            Err(OpenError::Decompress)
        );
        let mut plain =
            bincode::serde::encode_to_vec(Vec::<Record>::new(), bincode::config::standard())
                .unwrap();
        plain.push(0);
        let compressed = zstd::bulk::compress(&plain, ZSTD_LEVEL).unwrap();
        assert!(matches!(
            decode_records(&compressed, 0, VERSION),
            Err(OpenError::Decode(_))
        ));
        // A length prefix claiming 2^40 records fails on the limit, not on allocation.
        let huge = zstd::bulk::compress(&[253, 0, 0, 0, 0, 0, 1, 0, 0], ZSTD_LEVEL).unwrap();
        assert!(matches!(
            decode_records(&huge, 1, VERSION),
            Err(OpenError::CountMismatch { header: 1, .. })
        ));
    }

    /// Issue 9 item 15: a few hundred bytes announcing 600,000 records are refused on the count
    /// prefix, before a single record is decoded.
    #[test]
    fn a_count_prefix_other_than_the_header_count_is_refused_before_decoding() {
        let compressed = amplified_plaintext(600_000);
        assert!(compressed.len() < 2_000, "{}", compressed.len());
        assert_eq!(
            decode_records(&compressed, 4, VERSION),
            Err(OpenError::CountMismatch {
                header: 4,
                actual: 600_000
            })
        );
    }
}

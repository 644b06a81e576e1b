//! Errors of the seal and open sides.
//!
//! [`OpenError`] is what a hub (or `peek_header` in the store and uplink) gets back for bytes it
//! cannot accept. The envelope bytes come from the network or the disk, so every way they can be
//! wrong is a variant here, never a panic. [`OpenError::reason`] gives a constant snake_case label
//! for counters and structured logs; the `Display` text is for operators.
//!
//! [`SealError`] covers the few ways sealing can fail at the gateway: a batch that does not fit
//! the format's limits, or a codec/crypto library refusing its input.

use crate::reading::GatewayId;

/// Why an envelope was rejected. Checks run in a fixed order (see the module docs of `seal`), so
/// the variant also tells how far the envelope got.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The bytes end before the envelope does (or before `ct_len` says it does).
    #[error("envelope truncated")]
    Truncated,
    /// Bytes follow the signature.
    #[error("{extra} trailing bytes after the envelope signature")]
    TrailingBytes { extra: usize },
    /// The first four bytes are not `CGB1`.
    #[error("not a citygate batch (bad magic)")]
    BadMagic,
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    #[error("unknown cipher suite {0}")]
    UnknownSuite(u8),
    /// The gateway id field is empty, too long, not UTF-8 or contains invalid characters.
    #[error("invalid gateway id in header: {0}")]
    BadGatewayId(String),
    #[error("unknown stream code {0}")]
    UnknownStream(u8),
    /// The purpose name field is empty, too long, not UTF-8 or contains invalid characters.
    #[error("invalid purpose name in header: {0}")]
    BadPurpose(String),
    /// The header announces more records than any gateway may put in one batch.
    #[error("header announces {count} records; at most {limit} are accepted per batch")]
    TooManyRecords { count: u32, limit: u32 },
    /// No verifying key is registered for this gateway.
    #[error("gateway {0} is not registered")]
    UnknownGateway(GatewayId),
    /// The header names a signing key other than the one registered for the gateway.
    #[error("gateway {gateway} signed with key {} which is not its registered key", hex::encode(.key_id))]
    UnknownSignerKey { gateway: GatewayId, key_id: [u8; 8] },
    /// The Ed25519 signature does not verify (strictly) under the registered key.
    #[error("signature does not verify")]
    BadSignature,
    /// The batch was sealed to a different hub key.
    #[error("batch is sealed to hub key {}, not ours", hex::encode(.key_id))]
    WrongRecipient { key_id: [u8; 8] },
    /// HPKE decapsulation or AEAD decryption failed.
    #[error("ciphertext does not decrypt")]
    Undecryptable,
    /// The plaintext is not a valid zstd stream.
    #[error("plaintext is not valid zstd")]
    Decompress,
    /// The plaintext decompresses to more than the hard cap.
    #[error("plaintext decompresses to more than {limit} bytes")]
    DecompressedTooLarge { limit: usize },
    /// The decompressed plaintext is not a bincode-encoded `Vec<Record>`.
    #[error("records do not decode: {0}")]
    Decode(String),
    /// The header's record count disagrees with the records inside.
    #[error("header says {header} records, batch holds {actual}")]
    CountMismatch { header: u32, actual: usize },
}

impl OpenError {
    /// A constant snake_case label for counters and log fields.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            OpenError::Truncated => "truncated",
            OpenError::TrailingBytes { .. } => "trailing_bytes",
            OpenError::BadMagic => "bad_magic",
            OpenError::UnknownVersion(_) => "unknown_version",
            OpenError::UnknownSuite(_) => "unknown_suite",
            OpenError::BadGatewayId(_) => "bad_gateway_id",
            OpenError::UnknownStream(_) => "unknown_stream",
            OpenError::BadPurpose(_) => "bad_purpose",
            OpenError::TooManyRecords { .. } => "too_many_records",
            OpenError::UnknownGateway(_) => "unknown_gateway",
            OpenError::UnknownSignerKey { .. } => "unknown_signer_key",
            OpenError::BadSignature => "bad_signature",
            OpenError::WrongRecipient { .. } => "wrong_recipient",
            OpenError::Undecryptable => "undecryptable",
            OpenError::Decompress => "decompress",
            OpenError::DecompressedTooLarge { .. } => "decompressed_too_large",
            OpenError::Decode(_) => "decode",
            OpenError::CountMismatch { .. } => "count_mismatch",
        }
    }

    /// Whether the error was found by parsing alone, before any key was used.
    #[cfg(test)]
    pub(crate) fn is_parse_error(&self) -> bool {
        matches!(
            self,
            OpenError::Truncated
                | OpenError::TrailingBytes { .. }
                | OpenError::BadMagic
                | OpenError::UnknownVersion(_)
                | OpenError::UnknownSuite(_)
                | OpenError::BadGatewayId(_)
                | OpenError::UnknownStream(_)
                | OpenError::BadPurpose(_)
                | OpenError::TooManyRecords { .. }
        )
    }
}

/// Why a batch could not be sealed. None of these is retryable with the same input.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// More records than one envelope may carry ([`MAX_RECORDS_PER_BATCH`]).
    #[error("batch has {0} records; at most {max} fit in one envelope", max = super::MAX_RECORDS_PER_BATCH)]
    TooManyRecords(usize),
    /// The encoded records exceed what an opener will decompress.
    #[error("batch encodes to {size} bytes; the limit is {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// bincode refused the records.
    #[error("encoding records: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// zstd failed to compress.
    #[error("compressing records: {0}")]
    Compress(#[source] std::io::Error),
    /// HPKE refused to seal.
    #[error("hpke seal failed: {0}")]
    Hpke(hpke::HpkeError),
}

//! Where accepted batches go: the [`Sink`] trait and its two implementations.
//!
//! A sink owns de-duplication: [`Sink::commit`] takes a group of opened batches with distinct
//! keys and returns, per batch, whether it was written ([`Outcome::Written`]), was already held
//! ([`Outcome::Duplicate`], nothing written) or was refused for its data and recorded as such
//! ([`Outcome::Quarantined`]). Every outcome is durable when the call returns, because the hub
//! acknowledges all three on return; an `Err` means nothing of the group may be acknowledged
//! (the gateways re-send it).
//!
//! - [`JsonlDedupSink`] (`type = "jsonl"`, the default for one box and the demo): JSON Lines in
//!   one file ([`JsonlSink`], `jsonl.rs` documents the format) plus a local sled de-dup window
//!   (`hub::dedup`) and the crash recovery between the two (`dedup_jsonl.rs`). Its state is
//!   local, so hub processes sharing one subscription must not split a gateway between them.
//! - `PgSink` (`type = "postgres"`, `hub::pg`): the batch row and its records in one
//!   transaction keyed by (gateway, stream, incarnation, seq); exactly-once in the database,
//!   so any number of hub processes may share the subscription.

mod dedup_jsonl;
mod jsonl;

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::reading::{GatewayId, PurposeName, Record, Stream};

pub(crate) use dedup_jsonl::JsonlDedupSink;
#[cfg(test)]
pub(crate) use jsonl::encode_batch;
pub(crate) use jsonl::{emergency_id, quality_label, rfc3339_ms, JsonlSink};

/// The identity of a batch at the hub.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct BatchKey {
    pub gateway: GatewayId,
    pub stream: Stream,
    /// The gateway store's incarnation; 0 for envelopes of version 1.
    #[serde(default, with = "hex_u64")]
    pub incarnation: u64,
    pub seq: u64,
}

/// A u64 as 16 lowercase hex digits (JSON numbers above 2^53 do not survive every reader).
mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = <&str>::deserialize(d)?;
        if text.len() != 16 {
            return Err(serde::de::Error::custom(
                "incarnation must be 16 hex digits",
            ));
        }
        u64::from_str_radix(text, 16).map_err(serde::de::Error::custom)
    }
}

/// Why a sink could not commit (nothing of the group is acknowledged) or could not open.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Dedup(#[from] crate::hub::dedup::DedupError),
    /// The database could not be reached or failed the commit; retried with backoff.
    #[error("database: {0}")]
    Database(String),
    /// The database is reachable but not usable as configured (schema, credentials files).
    #[error("database: {0}")]
    Setup(String),
}

/// One opened batch on its way to the sink.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SinkBatch<'a> {
    pub key: &'a BatchKey,
    /// The purpose the batch was made under; `None` before envelope version 3.
    pub purpose: Option<&'a PurposeName>,
    /// Header fields besides the key; `None` only where a test writes records directly.
    pub header: Option<BatchMeta>,
    pub records: &'a [Record],
}

/// The envelope header fields a sink records besides the key and purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchMeta {
    /// When the gateway sealed the batch, ms since the Unix epoch.
    pub created_at_ms: i64,
    pub record_count: u32,
    pub policy_hash: [u8; 32],
    /// Key id of the gateway's signing key.
    pub signer_key_id: [u8; 8],
    /// Key id of the hub's HPKE key the batch was sealed to.
    pub recipient_key_id: [u8; 8],
}

/// What became of one batch of a committed group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Written now.
    Written,
    /// Already held: nothing written.
    Duplicate,
    /// Below a de-dup window that gave up a gap (JSONL only): taken as a duplicate.
    BelowWindow,
    /// Refused by the database for its data and recorded in its quarantine with `reason`.
    Quarantined { reason: String },
}

/// A destination for accepted batches. See the module docs.
pub(crate) trait Sink: Send + Sync + std::fmt::Debug {
    /// The sink's `type` as configured (`jsonl`, `postgres`), a metrics label.
    fn kind(&self) -> &'static str;

    /// Commits a group of batches with distinct keys; one outcome per batch, in order, all
    /// durable on return. Blocks.
    fn commit(&self, batches: &[SinkBatch<'_>]) -> Result<Vec<Outcome>, SinkError>;

    /// How many [`commit`](Sink::commit) calls may run at once to good effect (concurrent
    /// calls are always safe; beyond this many they wait for each other).
    fn parallel_commits(&self) -> usize {
        1
    }

    /// Checks the sink is there (a database answers), if the sink has anything to check;
    /// `None`: nothing to check, or not now. Blocks.
    fn probe(&self) -> Option<Result<(), SinkError>> {
        None
    }

    /// Batches found at start-up that the sink made known (crash recovery), if it has any.
    fn recovered(&self) -> u64 {
        0
    }

    /// Reopens the files the sink writes, after log rotation moved them (SIGHUP). Sinks
    /// without files do nothing.
    fn reopen(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A shared sink (the hub's retention job holds the PostgreSQL sink too).
impl<S: Sink> Sink for std::sync::Arc<S> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }

    fn commit(&self, batches: &[SinkBatch<'_>]) -> Result<Vec<Outcome>, SinkError> {
        (**self).commit(batches)
    }

    fn parallel_commits(&self) -> usize {
        (**self).parallel_commits()
    }

    fn probe(&self) -> Option<Result<(), SinkError>> {
        (**self).probe()
    }

    fn recovered(&self) -> u64 {
        (**self).recovered()
    }

    fn reopen(&self) -> Result<(), SinkError> {
        (**self).reopen()
    }
}

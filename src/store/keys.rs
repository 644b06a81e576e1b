//! The on-disk key layout (see the table in the module docs of `store`).
//!
//! Decoding never trusts the bytes: anything that is not exactly a batch key or a known
//! metadata key decodes to [`Key::Malformed`].

use crate::reading::Stream;

/// First byte of every metadata key; larger than every stream code, so metadata sorts last.
const META_PREFIX: u8 = 0xFF;
/// Length of a batch key: stream code + big-endian u64.
const BATCH_KEY_LEN: usize = 9;

/// A per-stream counter kept in metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaField {
    NextSeq,
    EvictedBatches,
    EvictedBytes,
    AckedBatches,
    PurgedBatches,
}

impl MetaField {
    pub(crate) const ALL: [MetaField; 5] = [
        MetaField::NextSeq,
        MetaField::EvictedBatches,
        MetaField::EvictedBytes,
        MetaField::AckedBatches,
        MetaField::PurgedBatches,
    ];

    fn name(self) -> &'static str {
        match self {
            MetaField::NextSeq => "next_seq",
            MetaField::EvictedBatches => "evicted_batches",
            MetaField::EvictedBytes => "evicted_bytes",
            MetaField::AckedBatches => "acked_batches",
            MetaField::PurgedBatches => "purged_batches",
        }
    }
}

/// What a raw key from the tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    Batch(Stream, u64),
    Meta(MetaField, Stream),
    /// The store's incarnation id (one per store, not per stream).
    Incarnation,
    /// The pipeline's checkpoint (one per store; opaque bytes of any length).
    Checkpoint,
    Malformed,
}

/// The name of the incarnation id's metadata key, after [`META_PREFIX`].
const INCARNATION: &[u8] = b"incarnation";
/// The name of the checkpoint's metadata key, after [`META_PREFIX`].
const CHECKPOINT: &[u8] = b"checkpoint";

/// `0xFF ‖ "checkpoint"`: the key of the pipeline's checkpoint.
pub(crate) fn checkpoint_key() -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + CHECKPOINT.len());
    k.push(META_PREFIX);
    k.extend_from_slice(CHECKPOINT);
    k
}

/// `0xFF ‖ "incarnation"`: the key of the store's incarnation id.
pub(crate) fn incarnation_key() -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + INCARNATION.len());
    k.push(META_PREFIX);
    k.extend_from_slice(INCARNATION);
    k
}

pub(crate) fn batch_key(stream: Stream, seq: u64) -> [u8; BATCH_KEY_LEN] {
    let mut k = [0u8; BATCH_KEY_LEN];
    k[0] = stream.code();
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The exclusive upper bound of `stream`'s batch keys: the bare next code, which sorts after
/// every 9-byte key of `stream` and before every key of the next stream.
pub(crate) fn stream_end(stream: Stream) -> [u8; 1] {
    [stream.code() + 1]
}

pub(crate) fn meta_key(field: MetaField, stream: Stream) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 24);
    k.push(META_PREFIX);
    k.extend_from_slice(field.name().as_bytes());
    k.push(b'/');
    k.extend_from_slice(stream.as_str().as_bytes());
    k
}

pub(crate) fn decode_key(raw: &[u8]) -> Key {
    match raw.split_first() {
        Some((&META_PREFIX, rest)) => decode_meta(rest),
        Some((&code, rest)) if raw.len() == BATCH_KEY_LEN => {
            match (Stream::from_code(code), <[u8; 8]>::try_from(rest)) {
                (Some(stream), Ok(seq)) => Key::Batch(stream, u64::from_be_bytes(seq)),
                _ => Key::Malformed,
            }
        }
        _ => Key::Malformed,
    }
}

fn decode_meta(rest: &[u8]) -> Key {
    if rest == INCARNATION {
        return Key::Incarnation;
    }
    if rest == CHECKPOINT {
        return Key::Checkpoint;
    }
    let Some((field, stream)) = std::str::from_utf8(rest)
        .ok()
        .and_then(|s| s.split_once('/'))
    else {
        return Key::Malformed;
    };
    let field = MetaField::ALL.into_iter().find(|f| f.name() == field);
    let stream = Stream::ALL.into_iter().find(|s| s.as_str() == stream);
    match (field, stream) {
        (Some(f), Some(s)) => Key::Meta(f, s),
        _ => Key::Malformed,
    }
}

pub(crate) fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// A metadata value; `None` if it is not exactly 8 bytes.
pub(crate) fn decode_u64(raw: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(raw).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for s in Stream::ALL {
            for seq in [0, 1, 255, 256, u64::MAX] {
                assert_eq!(decode_key(&batch_key(s, seq)), Key::Batch(s, seq));
            }
            for f in MetaField::ALL {
                assert_eq!(decode_key(&meta_key(f, s)), Key::Meta(f, s));
            }
        }
        assert_eq!(decode_key(&incarnation_key()), Key::Incarnation);
        assert_eq!(decode_key(&checkpoint_key()), Key::Checkpoint);
        assert_eq!(decode_key(b"\xFFincarnation/readings"), Key::Malformed);
    }

    #[test]
    fn order_is_stream_then_seq_then_meta() {
        let mut keys = [
            meta_key(MetaField::NextSeq, Stream::Readings),
            batch_key(Stream::Audit, 1).to_vec(),
            batch_key(Stream::Readings, 256).to_vec(),
            batch_key(Stream::Alarms, 0).to_vec(),
            batch_key(Stream::Readings, 2).to_vec(),
        ];
        keys.sort();
        let decoded: Vec<Key> = keys.iter().map(|k| decode_key(k)).collect();
        assert_eq!(
            decoded,
            vec![
                Key::Batch(Stream::Readings, 2),
                Key::Batch(Stream::Readings, 256),
                Key::Batch(Stream::Alarms, 0),
                Key::Batch(Stream::Audit, 1),
                Key::Meta(MetaField::NextSeq, Stream::Readings),
            ]
        );
        for s in Stream::ALL {
            assert!(batch_key(s, u64::MAX).as_slice() < stream_end(s).as_slice());
        }
        assert!(stream_end(Stream::Readings).as_slice() < batch_key(Stream::Alarms, 0).as_slice());
    }

    #[test]
    fn garbage_keys_are_malformed() {
        let garbage: [&[u8]; 7] = [
            b"",
            &[0],
            &[0, 1, 2],
            &[200, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            b"\xFFnext_seq/nowhere",
            b"\xFF\xC3(",
        ];
        for g in garbage {
            assert_eq!(decode_key(g), Key::Malformed, "{g:?}");
        }
        assert_eq!(decode_u64(&[1, 2, 3]), None);
        assert_eq!(decode_u64(&encode_u64(7)), Some(7));
    }
}

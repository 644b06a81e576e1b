//! End-to-end acknowledgements: what the hub publishes once a batch is durably written.
//!
//! # Wire encoding, version 1
//!
//! Published on `citygate/v1/{gateway_id}/ack`, the payload is one UTF-8 JSON object, no
//! trailing newline, members in this order when written:
//!
//! ```text
//! {"v":1,"gateway":"gw-test-01","stream":"readings","seq":123}
//! ```
//!
//! | member    | type                     | meaning                                              |
//! |-----------|--------------------------|------------------------------------------------------|
//! | `v`       | integer, must be 1       | ack format version                                   |
//! | `gateway` | string, a gateway id     | the gateway whose batch this is (also in the topic)  |
//! | `stream`  | `"readings"`, `"alarms"` or `"audit"` | the batch's stream                      |
//! | `seq`     | integer, 0..=2^64-1      | the batch's sequence number                          |
//!
//! Readers must reject another `v`, a missing member, a wrong type, an unknown stream, an invalid
//! gateway id and payloads longer than [`MAX_ACK_BYTES`]; members they do not know are ignored
//! (room for later additions within version 1). The gateway checks `gateway` is its own id before
//! deleting anything. An ack means: the batch's records are durably in the hub's sink and its
//! (gateway, stream, seq) is durably marked as seen; it is sent again for a re-sent batch.
//! [`Ack::decode`] never panics, whatever the bytes.

use serde::{Deserialize, Serialize};

use crate::reading::{GatewayId, Stream};

/// The ack format version written in `v`.
pub const ACK_VERSION: u8 = 1;
/// Longest payload [`Ack::decode`] accepts (a full-length gateway id fits with room to spare).
pub const MAX_ACK_BYTES: usize = 512;

/// "Batch `seq` of `stream` from `gateway` is durably written."
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ack {
    pub gateway: GatewayId,
    pub stream: Stream,
    pub seq: u64,
}

/// Why an ack payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("ack payload is {0} bytes; at most {MAX_ACK_BYTES} are accepted")]
    TooLong(usize),
    #[error("ack is not valid: {0}")]
    Malformed(String),
    #[error("unknown ack version {0}")]
    UnknownVersion(u64),
}

#[derive(Serialize, Deserialize)]
struct WireAck {
    v: u64,
    gateway: GatewayId,
    stream: Stream,
    seq: u64,
}

impl Ack {
    /// The JSON payload described in the module docs.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let wire = WireAck {
            v: u64::from(ACK_VERSION),
            gateway: self.gateway.clone(),
            stream: self.stream,
            seq: self.seq,
        };
        serde_json::to_vec(&wire).expect("invariant: an ack of plain fields serialises")
    }

    /// Parses a payload; any deviation from the format is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Ack, AckError> {
        if bytes.len() > MAX_ACK_BYTES {
            return Err(AckError::TooLong(bytes.len()));
        }
        let wire: WireAck =
            serde_json::from_slice(bytes).map_err(|e| AckError::Malformed(e.to_string()))?;
        if wire.v != u64::from(ACK_VERSION) {
            return Err(AckError::UnknownVersion(wire.v));
        }
        Ok(Ack {
            gateway: wire.gateway,
            stream: wire.stream,
            seq: wire.seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encoding_is_the_documented_json() {
        let ack = Ack {
            gateway: GatewayId::new("gw-test-01").unwrap(),
            stream: Stream::Readings,
            seq: 123,
        };
        let bytes = ack.encode();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"v":1,"gateway":"gw-test-01","stream":"readings","seq":123}"#
        );
        assert_eq!(Ack::decode(&bytes).unwrap(), ack);
    }

    #[test]
    fn garbage_and_near_misses_are_errors() {
        for bad in [
            &b""[..],
            b"null",
            b"{}",
            b"\xff\xfe",
            br#"{"v":2,"gateway":"g","stream":"readings","seq":1}"#,
            br#"{"v":1,"gateway":"g/1","stream":"readings","seq":1}"#,
            br#"{"v":1,"gateway":"g","stream":"telemetry","seq":1}"#,
            br#"{"v":1,"gateway":"g","stream":"readings","seq":-1}"#,
            br#"{"v":1,"gateway":"g","stream":"readings"}"#,
        ] {
            assert!(
                Ack::decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            Ack::decode(&[b' '; MAX_ACK_BYTES + 1]),
            Err(AckError::TooLong(_))
        ));
        let extra = br#"{"v":1,"gateway":"g","stream":"audit","seq":9,"later":true}"#;
        assert_eq!(Ack::decode(extra).unwrap().seq, 9);
    }

    proptest! {
        #[test]
        fn round_trips(gw in "[a-zA-Z0-9._-]{1,64}", code in 0u8..3, seq in any::<u64>()) {
            let ack = Ack {
                gateway: GatewayId::new(gw).unwrap(),
                stream: Stream::from_code(code).unwrap(),
                seq,
            };
            prop_assert_eq!(Ack::decode(&ack.encode()).unwrap(), ack);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Ack::decode(&bytes);
        }
    }
}

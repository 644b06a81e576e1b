//! End-to-end acknowledgements: what the hub publishes once a batch is durably written, signed
//! so that a gateway deletes nothing on the word of anyone else.
//!
//! # Wire encoding, version 2
//!
//! Published on `citygate/v1/{gateway_id}/ack`, the payload is one UTF-8 JSON object, no
//! trailing newline, members in this order when written:
//!
//! ```text
//! {"v":2,"gateway":"gw-test-01","stream":"readings","incarnation":"5eed0000000000ff","seq":123,
//!  "key":"0123456789abcdef","sig":"<128 hex digits>"}
//! ```
//!
//! | member        | type                      | meaning                                          |
//! |---------------|---------------------------|--------------------------------------------------|
//! | `v`           | integer, must be 2        | ack format version                               |
//! | `gateway`     | string, a gateway id      | the gateway whose batch this is (also in the topic) |
//! | `stream`      | `"readings"`, `"alarms"` or `"audit"` | the batch's stream                   |
//! | `incarnation` | string, 16 lowercase hex digits | the envelope header's store incarnation (u64) |
//! | `seq`         | integer, 0..=2^64-1       | the batch's sequence number                      |
//! | `key`         | string, 16 lowercase hex digits | key id of the hub's ack-signing key (first 8 bytes of SHA-256 of the Ed25519 public key) |
//! | `sig`         | string, 128 lowercase hex digits | Ed25519 signature (RFC 8032) by that key over the message below |
//!
//! The signed message binds every member that selects what the gateway deletes:
//!
//! ```text
//! "citygate ack v2" (15 ASCII bytes) ‖ 0x00 ‖ gateway_len u8 ‖ gateway (UTF-8)
//!   ‖ stream code u8 (0 readings, 1 alarms, 2 audit) ‖ incarnation u64 BE ‖ seq u64 BE
//! ```
//!
//! Readers reject another `v` (version 1 acks, which were unsigned, included), a missing
//! member, a wrong type, an unknown stream, an invalid gateway id, hex of the wrong length and
//! payloads longer than [`MAX_ACK_BYTES`]; members they do not know are ignored. A gateway
//! acts on an ack only if its `key` is the hub ack key it was configured with and the signature
//! verifies strictly (`verify_strict`) — then checks `gateway` is its own id and `incarnation`
//! its store's before deleting anything. An ack means: the batch's records are durably in the
//! hub's sink and its (gateway, stream, incarnation, seq) is durably marked as seen; it is sent
//! again for a re-sent batch. Decoding never panics, whatever the bytes.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::reading::{GatewayId, Stream};
use crate::seal::key_id;

/// The ack format version written in `v`.
pub const ACK_VERSION: u8 = 2;
/// Longest payload accepted (a full-length gateway id fits with room to spare).
pub const MAX_ACK_BYTES: usize = 512;
/// Domain separation of the signed message.
const SIGNING_CONTEXT: &[u8] = b"citygate ack v2\0";

/// "Batch `seq` of `stream` in store incarnation `incarnation` of `gateway` is durably written."
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ack {
    pub gateway: GatewayId,
    pub stream: Stream,
    pub incarnation: u64,
    pub seq: u64,
}

/// Why an ack payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("ack payload is {0} bytes; at most {MAX_ACK_BYTES} are accepted")]
    TooLong(usize),
    #[error("ack is not valid: {0}")]
    Malformed(String),
    #[error("unknown ack version {0} (version 2, signed by the hub, is required)")]
    UnknownVersion(u64),
    #[error("ack signed with key {0}, not the configured hub ack key")]
    UnknownKey(String),
    #[error("ack signature does not verify")]
    BadSignature,
}

impl AckError {
    /// Whether the payload was well-formed but not provably from the hub.
    pub(crate) fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            AckError::UnknownVersion(_) | AckError::UnknownKey(_) | AckError::BadSignature
        )
    }
}

#[derive(Serialize, Deserialize)]
struct WireAck {
    v: u64,
    gateway: GatewayId,
    stream: Stream,
    incarnation: String,
    seq: u64,
    key: String,
    sig: String,
}

/// Only `v` first, so a version other than 2 is reported as such whatever else it holds.
#[derive(Deserialize)]
struct WireVersion {
    v: u64,
}

impl Ack {
    /// The message the hub signs (see the module docs).
    fn signed_message(&self) -> Vec<u8> {
        let gateway = self.gateway.as_str().as_bytes();
        let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + 1 + gateway.len() + 17);
        m.extend_from_slice(SIGNING_CONTEXT);
        m.push(u8::try_from(gateway.len()).expect("invariant: GatewayId is at most 64 bytes"));
        m.extend_from_slice(gateway);
        m.push(self.stream.code());
        m.extend_from_slice(&self.incarnation.to_be_bytes());
        m.extend_from_slice(&self.seq.to_be_bytes());
        m
    }
}

fn hex_array<const N: usize>(s: &str, what: &str) -> Result<[u8; N], AckError> {
    let bytes = hex::decode(s).map_err(|_| AckError::Malformed(format!("{what} is not hex")))?;
    <[u8; N]>::try_from(bytes.as_slice())
        .map_err(|_| AckError::Malformed(format!("{what} is not {} hex digits", 2 * N)))
}

/// The hub's side: signs acks with its ack-signing key.
pub struct AckSigner {
    key: SigningKey,
    key_id: [u8; 8],
}

impl AckSigner {
    pub fn new(key: SigningKey) -> AckSigner {
        let key_id = key_id(key.verifying_key().as_bytes());
        AckSigner { key, key_id }
    }

    /// The JSON payload described in the module docs.
    pub fn encode(&self, ack: &Ack) -> Vec<u8> {
        let sig = self.key.sign(&ack.signed_message());
        let wire = WireAck {
            v: u64::from(ACK_VERSION),
            gateway: ack.gateway.clone(),
            stream: ack.stream,
            incarnation: format!("{:016x}", ack.incarnation),
            seq: ack.seq,
            key: hex::encode(self.key_id),
            sig: hex::encode(sig.to_bytes()),
        };
        serde_json::to_vec(&wire).expect("invariant: an ack of plain fields serialises")
    }
}

impl fmt::Debug for AckSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckSigner")
            .field("key_id", &hex::encode(self.key_id))
            .finish()
    }
}

/// The gateway's side: accepts only acks signed by the configured hub ack key.
#[derive(Clone)]
pub struct AckVerifier {
    key: VerifyingKey,
    key_id: [u8; 8],
}

impl AckVerifier {
    pub fn new(key: VerifyingKey) -> AckVerifier {
        let key_id = key_id(key.as_bytes());
        AckVerifier { key, key_id }
    }

    /// Parses a payload and verifies its signature; any deviation from the format, another
    /// key or a bad signature is an error, never a panic.
    pub fn verify(&self, bytes: &[u8]) -> Result<Ack, AckError> {
        if bytes.len() > MAX_ACK_BYTES {
            return Err(AckError::TooLong(bytes.len()));
        }
        let version: WireVersion =
            serde_json::from_slice(bytes).map_err(|e| AckError::Malformed(e.to_string()))?;
        if version.v != u64::from(ACK_VERSION) {
            return Err(AckError::UnknownVersion(version.v));
        }
        let wire: WireAck =
            serde_json::from_slice(bytes).map_err(|e| AckError::Malformed(e.to_string()))?;
        let key = hex_array::<8>(&wire.key, "key")?;
        let sig = Signature::from_bytes(&hex_array::<64>(&wire.sig, "sig")?);
        let ack = Ack {
            gateway: wire.gateway,
            stream: wire.stream,
            incarnation: u64::from_be_bytes(hex_array::<8>(&wire.incarnation, "incarnation")?),
            seq: wire.seq,
        };
        if key != self.key_id {
            return Err(AckError::UnknownKey(wire.key));
        }
        self.key
            .verify_strict(&ack.signed_message(), &sig)
            .map_err(|_| AckError::BadSignature)?;
        Ok(ack)
    }
}

impl fmt::Debug for AckVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckVerifier")
            .field("key_id", &hex::encode(self.key_id))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hub_key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn ack() -> Ack {
        Ack {
            gateway: GatewayId::new("gw-test-01").unwrap(),
            stream: Stream::Readings,
            incarnation: 0x5eed_0000_0000_00ff,
            seq: 123,
        }
    }

    #[test]
    fn encoding_is_the_documented_json_and_verifies() {
        let signer = AckSigner::new(hub_key());
        let bytes = signer.encode(&ack());
        let text = std::str::from_utf8(&bytes).unwrap();
        let key_id = hex::encode(key_id(hub_key().verifying_key().as_bytes()));
        let prefix = format!(
            r#"{{"v":2,"gateway":"gw-test-01","stream":"readings","incarnation":"5eed0000000000ff","seq":123,"key":"{key_id}","sig":""#
        );
        assert!(text.starts_with(&prefix), "{text}");
        assert!(bytes.len() < MAX_ACK_BYTES);
        let verifier = AckVerifier::new(hub_key().verifying_key());
        assert_eq!(verifier.verify(&bytes).unwrap(), ack());
    }

    /// Issue 9 item 1: an ack anyone could write (version 1, unsigned), one signed by another
    /// key, and a genuine signature moved to another seq, incarnation, stream or gateway are all
    /// refused as unauthenticated.
    #[test]
    fn forged_unsigned_and_altered_acks_are_refused() {
        let verifier = AckVerifier::new(hub_key().verifying_key());
        let v1 = br#"{"v":1,"gateway":"gw-test-01","stream":"readings","seq":123}"#;
        assert_eq!(verifier.verify(v1), Err(AckError::UnknownVersion(1)));

        let stranger = AckSigner::new(SigningKey::from_bytes(&[8; 32]));
        let err = verifier.verify(&stranger.encode(&ack())).unwrap_err();
        assert!(matches!(err, AckError::UnknownKey(_)), "{err}");
        assert!(err.is_unauthenticated());

        let genuine = String::from_utf8(AckSigner::new(hub_key()).encode(&ack())).unwrap();
        for altered in [
            genuine.replace(r#""seq":123"#, r#""seq":124"#),
            genuine.replace("5eed0000000000ff", "5eed0000000000fe"),
            genuine.replace(r#""readings""#, r#""alarms""#),
            genuine.replace("gw-test-01", "gw-test-02"),
        ] {
            assert_ne!(altered, genuine);
            assert_eq!(
                verifier.verify(altered.as_bytes()),
                Err(AckError::BadSignature),
                "{altered}"
            );
        }
    }

    #[test]
    fn garbage_and_near_misses_are_errors() {
        let verifier = AckVerifier::new(hub_key().verifying_key());
        let good = String::from_utf8(AckSigner::new(hub_key()).encode(&ack())).unwrap();
        for bad in [
            String::new(),
            "null".into(),
            "{}".into(),
            good.replace("gw-test-01", "gw/1"),
            good.replace("readings", "telemetry"),
            good.replace(r#""seq":123"#, r#""seq":-1"#),
            good.replace(r#","seq":123"#, ""),
            good.replace("5eed0000000000ff", "5eed00ff"),
            good.replace("5eed0000000000ff", "5eed00000000zzff"),
        ] {
            assert!(verifier.verify(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(verifier.verify(b"\xff\xfe").is_err());
        assert!(matches!(
            verifier.verify(&[b' '; MAX_ACK_BYTES + 1]),
            Err(AckError::TooLong(_))
        ));
        let extra = good.replacen('{', r#"{"later":true,"#, 1);
        assert_eq!(verifier.verify(extra.as_bytes()).unwrap(), ack());
    }

    proptest! {
        #[test]
        fn round_trips(gw in "[a-zA-Z0-9._-]{1,64}", code in 0u8..3, inc in any::<u64>(), seq in any::<u64>()) {
            let ack = Ack {
                gateway: GatewayId::new(gw).unwrap(),
                stream: Stream::from_code(code).unwrap(),
                incarnation: inc,
                seq,
            };
            let bytes = AckSigner::new(hub_key()).encode(&ack);
            prop_assert_eq!(AckVerifier::new(hub_key().verifying_key()).verify(&bytes).unwrap(), ack);
        }

        #[test]
        fn verify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = AckVerifier::new(hub_key().verifying_key()).verify(&bytes);
        }
    }
}

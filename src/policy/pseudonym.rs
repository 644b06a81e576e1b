//! Keyed pseudonyms: `p-` + hex of the first 16 bytes of HMAC-SHA256 under the
//! deployment's pseudonym key, over a domain-separation context and length-prefixed
//! parts. The same input always maps to the same pseudonym under one key; without the
//! key the mapping cannot be recomputed from a list of candidate ids.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::seal::PseudonymKey;

/// Context of device pseudonyms (record subjects).
pub(crate) const DEVICE_CONTEXT: &[u8] = b"citygate/v1/device\0";
/// Context of value pseudonyms (identifier fields).
pub(crate) const VALUE_CONTEXT: &[u8] = b"citygate/v1/value\0";

/// `p-` + hex of the first 16 bytes of HMAC-SHA256(key, context ‖ len ‖ part ‖ …).
pub(crate) fn mac(key: &PseudonymKey, context: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
        .expect("invariant: HMAC accepts any key length");
    mac.update(context);
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    let tag = mac.finalize().into_bytes();
    format!("p-{}", hex::encode(&tag[..16]))
}

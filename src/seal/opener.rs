//! The hub side: [`Opener`] verifies and decrypts envelopes from registered gateways.
//!
//! Checks run in a fixed order, cheapest and least secret first, and the first failure is
//! returned: parse (magic, version, suite, gateway id, stream, framing) → gateway registered →
//! signer key id is the registered key's → Ed25519 `verify_strict` over header ‖ ct_len ‖
//! ciphertext → recipient key id is ours → HPKE open (aad = header bytes) → capped zstd
//! decompression → bincode decode → record count matches the header. So nothing is decrypted
//! before its origin is authenticated, and an envelope that fails tells in
//! [`OpenError::reason`] how far it got.
//!
//! Opening does not de-duplicate: a replayed envelope opens again. The hub de-duplicates on
//! (gateway, stream, seq), which the signature binds to the content.

use std::collections::HashMap;
use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use hpke::{Deserializable, OpModeR};

use crate::reading::{GatewayId, Record};

use super::envelope::{parse_frame, Header};
use super::error::OpenError;
use super::key_types::{key_id, HubKem, HubSecretKey};
use super::{codec, HpkeAead, HpkeKdf, HPKE_INFO};

/// A verified, decrypted batch.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenedBatch {
    pub header: Header,
    pub records: Vec<Record>,
}

#[derive(Clone)]
struct RegisteredGateway {
    key: VerifyingKey,
    key_id: [u8; 8],
}

/// Opens envelopes sealed to one hub key, from the gateways registered with it.
pub struct Opener {
    hub_secret: HubSecretKey,
    hub_key_id: [u8; 8],
    gateways: HashMap<GatewayId, RegisteredGateway>,
}

impl Opener {
    pub fn new(hub_secret: HubSecretKey) -> Opener {
        let hub_key_id = hub_secret.key_id();
        Opener {
            hub_secret,
            hub_key_id,
            gateways: HashMap::new(),
        }
    }

    /// Registers (or replaces) the verifying key of `gateway`.
    pub fn register(&mut self, gateway: GatewayId, key: VerifyingKey) {
        let key_id = key_id(key.as_bytes());
        self.gateways
            .insert(gateway, RegisteredGateway { key, key_id });
    }

    /// Verifies, decrypts and decodes one envelope.
    pub fn open(&self, bytes: &[u8]) -> Result<OpenedBatch, OpenError> {
        let frame = parse_frame(bytes)?;
        let header = frame.header;

        let registered = self
            .gateways
            .get(&header.gateway)
            .ok_or_else(|| OpenError::UnknownGateway(header.gateway.clone()))?;
        if header.signer_key_id != registered.key_id {
            return Err(OpenError::UnknownSignerKey {
                gateway: header.gateway.clone(),
                key_id: header.signer_key_id,
            });
        }
        let signature = Signature::from_bytes(&frame.signature);
        registered
            .key
            .verify_strict(frame.signed, &signature)
            .map_err(|_| OpenError::BadSignature)?;

        if header.recipient_key_id != self.hub_key_id {
            return Err(OpenError::WrongRecipient {
                key_id: header.recipient_key_id,
            });
        }
        let encapped_key = <HubKem as hpke::Kem>::EncappedKey::from_bytes(&header.encapped_key)
            .map_err(|_| OpenError::Undecryptable)?;
        let plaintext = hpke::single_shot_open::<HpkeAead, HpkeKdf, HubKem>(
            &OpModeR::Base,
            self.hub_secret.inner(),
            &encapped_key,
            HPKE_INFO,
            frame.ciphertext,
            frame.header_bytes,
        )
        .map_err(|_| OpenError::Undecryptable)?;

        let records = codec::decode_records(&plaintext, header.record_count, header.version)?;
        if u32::try_from(records.len()) != Ok(header.record_count) {
            return Err(OpenError::CountMismatch {
                header: header.record_count,
                actual: records.len(),
            });
        }
        Ok(OpenedBatch { header, records })
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut gateways: Vec<_> = self.gateways.keys().map(GatewayId::as_str).collect();
        gateways.sort_unstable();
        f.debug_struct("Opener")
            .field("hub_key_id", &hex::encode(self.hub_key_id))
            .field("gateways", &gateways)
            .finish()
    }
}

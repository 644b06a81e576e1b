//! The gateway side: [`Sealer`] turns records into a [`SealedBatch`].
//!
//! Sealing is: encode and compress the records ([`codec`](super::codec)), run HPKE `SetupBaseS`
//! to the hub's key to get `enc` and an AEAD context, build the header (which contains `enc`),
//! encrypt with the header bytes as associated data, append `ct_len` and the ciphertext, and sign
//! everything so far with Ed25519. Sealing needs no secret of the hub and yields nothing the
//! gateway itself can decrypt: a stolen gateway leaks no stored batch.
//!
//! The only randomness is HPKE's ephemeral key (Ed25519 signing is deterministic), so
//! [`Sealer::seal_with_rng`] with a seeded RNG reproduces an envelope byte for byte; that is how
//! the committed test vector is made. Production code calls [`Sealer::seal`], which uses the OS
//! RNG.

use std::fmt;
use std::sync::{Mutex, PoisonError};

use ed25519_dalek::{Signer, SigningKey};
use hpke::{OpModeS, Serializable};
use rand::rngs::OsRng;
use rand::{CryptoRng, RngCore};

use crate::reading::{GatewayId, Record, Stream};

use super::stamp::PolicyStamp;

use super::envelope::{
    Header, SealedBatch, MAX_RECORDS_PER_BATCH, SIGNATURE_LEN,
    SUITE_X25519_CHACHA20POLY1305_ED25519, VERSION,
};
use super::error::SealError;
use super::key_types::{key_id, HubKem, HubPublicKey};
use super::{codec, HpkeAead, HpkeKdf, HPKE_INFO};

/// Seals batches for one gateway to one hub key; each batch names the policy it was made under.
pub struct Sealer {
    gateway: GatewayId,
    signing: SigningKey,
    signer_key_id: [u8; 8],
    hub: HubPublicKey,
    incarnation: u64,
    /// One compression context for every batch (made at the first seal).
    encoder: Mutex<Option<codec::Encoder>>,
}

impl Sealer {
    pub fn new(
        gateway: GatewayId,
        signing: SigningKey,
        hub: HubPublicKey,
        incarnation: u64,
    ) -> Sealer {
        let signer_key_id = key_id(signing.verifying_key().as_bytes());
        Sealer {
            gateway,
            signing,
            signer_key_id,
            hub,
            incarnation,
            encoder: Mutex::new(None),
        }
    }

    /// Seals `records`, made under `stamp`, as batch `seq` of `stream`, with HPKE randomness
    /// from the OS.
    pub fn seal(
        &self,
        stream: Stream,
        seq: u64,
        created_at_ms: i64,
        stamp: &PolicyStamp,
        records: &[Record],
    ) -> Result<SealedBatch, SealError> {
        self.seal_with_rng(stream, seq, created_at_ms, stamp, records, &mut OsRng)
    }

    /// Like [`Sealer::seal`] with a caller-supplied RNG; a seeded RNG gives reproducible bytes.
    pub(crate) fn seal_with_rng(
        &self,
        stream: Stream,
        seq: u64,
        created_at_ms: i64,
        stamp: &PolicyStamp,
        records: &[Record],
        rng: &mut (impl CryptoRng + RngCore),
    ) -> Result<SealedBatch, SealError> {
        let record_count = u32::try_from(records.len())
            .ok()
            .filter(|&n| n <= MAX_RECORDS_PER_BATCH)
            .ok_or(SealError::TooManyRecords(records.len()))?;
        let plaintext = {
            let mut slot = self.encoder.lock().unwrap_or_else(PoisonError::into_inner);
            let encoder = match slot.as_mut() {
                Some(e) => e,
                None => slot.insert(codec::Encoder::new()?),
            };
            encoder.encode(records)?
        };
        self.seal_plaintext(
            stream,
            seq,
            created_at_ms,
            stamp,
            record_count,
            &plaintext,
            rng,
        )
    }

    /// Seals an already encoded plaintext. Separate so tests can build envelopes whose
    /// plaintext or record count is wrong but whose crypto is right.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn seal_plaintext(
        &self,
        stream: Stream,
        seq: u64,
        created_at_ms: i64,
        stamp: &PolicyStamp,
        record_count: u32,
        plaintext: &[u8],
        rng: &mut (impl CryptoRng + RngCore),
    ) -> Result<SealedBatch, SealError> {
        let (encapped_key, mut aead) = hpke::setup_sender::<HpkeAead, HpkeKdf, HubKem, _>(
            &OpModeS::Base,
            self.hub.inner(),
            HPKE_INFO,
            rng,
        )
        .map_err(SealError::Hpke)?;

        let header = Header {
            version: VERSION,
            suite: SUITE_X25519_CHACHA20POLY1305_ED25519,
            gateway: self.gateway.clone(),
            stream,
            purpose: Some(stamp.purpose.clone()),
            incarnation: self.incarnation,
            seq,
            created_at_ms,
            record_count,
            policy_hash: stamp.hash,
            signer_key_id: self.signer_key_id,
            recipient_key_id: self.hub.key_id(),
            encapped_key: encapped_key.to_bytes().into(),
        };
        let mut bytes = header.encode();
        let header_len = bytes.len();

        let ciphertext = aead
            .seal(plaintext, &bytes[..header_len])
            .map_err(SealError::Hpke)?;
        let ct_len = u32::try_from(ciphertext.len()).map_err(|_| SealError::TooLarge {
            size: ciphertext.len(),
            limit: u32::MAX as usize,
        })?;
        bytes.reserve(4 + ciphertext.len() + SIGNATURE_LEN);
        bytes.extend_from_slice(&ct_len.to_be_bytes());
        bytes.extend_from_slice(&ciphertext);
        let signature = self.signing.sign(&bytes);
        bytes.extend_from_slice(&signature.to_bytes());

        Ok(SealedBatch {
            stream,
            seq,
            bytes,
            checkpoint: None,
        })
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("gateway", &self.gateway)
            .field("signer_key_id", &hex::encode(self.signer_key_id))
            .field("recipient_key_id", &hex::encode(self.hub.key_id()))
            .finish()
    }
}

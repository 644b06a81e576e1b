//! Key types: the hub's HPKE key pair, the pseudonym key, and key ids.
//!
//! The hub keys wrap rust-hpke's X25519 types for DHKEM(X25519, HKDF-SHA256); gateways hold only
//! [`HubPublicKey`]. A key id is the first 8 bytes of SHA-256 of the raw 32-byte public key
//! ([`key_id`]); it names keys in envelope headers, logs and `Debug` output. Secret types never
//! print their bytes: `Debug` shows the key id only. For the pseudonym key, which has no public
//! half, the id is the same function of the key itself (a fingerprint, not a secret).
//! [`PseudonymKey`] is zeroized on drop. (rust-hpke 0.12 builds x25519-dalek without its
//! `zeroize` feature, so the hub secret key is not wiped on drop.)

use std::fmt;

use hpke::{Deserializable, Kem as _, Serializable};
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// The HPKE KEM of suite 1: DHKEM(X25519, HKDF-SHA256), RFC 9180 KEM id 0x0020.
pub(crate) type HubKem = hpke::kem::X25519HkdfSha256;

/// The key id of a raw 32-byte public key: the first 8 bytes of its SHA-256.
pub fn key_id(public: &[u8; 32]) -> [u8; 8] {
    let digest = Sha256::digest(public);
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    id
}

/// The hub's HPKE public key (X25519): what gateways seal batches to.
#[derive(Clone, PartialEq, Eq)]
pub struct HubPublicKey(<HubKem as hpke::Kem>::PublicKey);

impl HubPublicKey {
    pub(crate) fn from_bytes(bytes: &[u8; 32]) -> Self {
        HubPublicKey(
            <HubKem as hpke::Kem>::PublicKey::from_bytes(bytes)
                .expect("invariant: any 32 bytes are an X25519 public key"),
        )
    }

    pub(crate) fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes().into()
    }

    pub fn key_id(&self) -> [u8; 8] {
        key_id(&self.to_bytes())
    }

    pub(crate) fn inner(&self) -> &<HubKem as hpke::Kem>::PublicKey {
        &self.0
    }
}

impl fmt::Debug for HubPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubPublicKey")
            .field("key_id", &hex::encode(self.key_id()))
            .finish()
    }
}

/// The hub's HPKE secret key (X25519). Only the hub holds it; `Debug` shows only its key id.
#[derive(Clone)]
pub struct HubSecretKey(<HubKem as hpke::Kem>::PrivateKey);

impl HubSecretKey {
    /// Wraps a raw X25519 secret key (clamped on use, RFC 7748).
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        HubSecretKey(
            <HubKem as hpke::Kem>::PrivateKey::from_bytes(bytes)
                .expect("invariant: any 32 bytes are an X25519 secret key"),
        )
    }

    pub(crate) fn generate(rng: &mut (impl CryptoRng + RngCore)) -> Self {
        HubSecretKey(HubKem::gen_keypair(rng).0)
    }

    pub fn public_key(&self) -> HubPublicKey {
        HubPublicKey(HubKem::sk_to_pk(&self.0))
    }

    /// The key id of the matching public key.
    pub fn key_id(&self) -> [u8; 8] {
        self.public_key().key_id()
    }

    pub(super) fn to_secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes().into())
    }

    pub(crate) fn inner(&self) -> &<HubKem as hpke::Kem>::PrivateKey {
        &self.0
    }
}

impl fmt::Debug for HubSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSecretKey")
            .field("key_id", &hex::encode(self.key_id()))
            .finish()
    }
}

/// The key of the keyed pseudonyms records carry instead of device ids, with its epoch.
/// Zeroized on drop.
///
/// The epoch counts key rotations (`citygate keys rotate-pseudonym`): every record carries
/// the epoch its pseudonyms were made in, so the hub can tell key periods apart (the same
/// meter has a different pseudonym in each epoch, and nothing on the box can link them once
/// the old key is gone).
#[derive(Clone)]
pub struct PseudonymKey([u8; 32], u32);

impl PseudonymKey {
    /// A key of epoch 0.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PseudonymKey(bytes, 0)
    }

    /// The same key, stamped with `epoch`.
    pub fn with_epoch(mut self, epoch: u32) -> Self {
        self.1 = epoch;
        self
    }

    pub(crate) fn generate(rng: &mut (impl CryptoRng + RngCore)) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        PseudonymKey(bytes, 0)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// How many times the key was rotated before this one.
    pub fn epoch(&self) -> u32 {
        self.1
    }

    /// A fingerprint of the key, for logs.
    pub fn key_id(&self) -> [u8; 8] {
        key_id(&self.0)
    }
}

impl Drop for PseudonymKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PseudonymKey")
            .field("key_id", &hex::encode(self.key_id()))
            .field("epoch", &self.1)
            .finish()
    }
}

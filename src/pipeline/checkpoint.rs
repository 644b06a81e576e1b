//! Checkpoints of the purpose flows' open aggregate windows, so a crash (SIGKILL, power loss,
//! OOM kill) does not lose a day's billing window or a counter's history.
//!
//! A [`Checkpoint`] holds every purpose flow's [`EngineState`] (keyed by stream and policy
//! hash) and the aggregate records the flows emitted but the batcher had not yet sealed. It
//! is stored in the store, compressed (zstd) and encrypted (ChaCha20-Poly1305 under a key derived from the
//! pseudonym key with HMAC-SHA256 and a fixed context; the epoch travels with it), either:
//! - **with a batch that holds aggregate records**, in the same atomic write: a window's
//!   aggregate is committed together with the state in which the window is closed, so after
//!   a crash an aggregate is never emitted twice and never lost; or
//! - **on its own**, every `[batch] checkpoint_every` (default 30 s) while samples arrive,
//!   ordered after every batch sealed before it: this bounds what a crash costs to the
//!   samples of that interval (a counter's delta loses nothing: its history resumes).
//!
//! At start the supervisor opens the last checkpoint: each flow whose stream and policy hash
//! still match resumes its windows; pending aggregates go back into the open batches. A
//! checkpoint under another pseudonym key epoch, another policy, or damaged, is dropped with
//! a warning (its windows are lost, as before checkpoints). The emergency flow is not
//! checkpointed: what it has open at a crash is lost, like its open batch.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::policy::EngineState;
use crate::reading::{Record, Stream};
use crate::seal::PseudonymKey;

const MAGIC: &[u8; 4] = b"CGCK";
const VERSION: u8 = 1;
const CONTEXT: &[u8] = b"citygate/v1/checkpoint";
const NONCE_LEN: usize = 12;
/// The most a checkpoint may decompress to (a checkpoint of 10,000 meters' windows is a few
/// tens of MiB): a damaged or hostile one cannot exhaust memory.
const MAX_PLAIN: usize = 256 * 1024 * 1024;
/// zstd level: checkpoints repeat names and subjects, and are written often.
const ZSTD_LEVEL: i32 = 3;

/// One flow's state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FlowState {
    pub stream: Stream,
    /// The flow's policy hash (its stamp's): a changed policy does not resume old windows.
    pub policy_hash: [u8; 32],
    pub state: EngineState,
}

/// The flows' state and their unsealed aggregates; see the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub taken_ms: i64,
    pub flows: Vec<FlowState>,
    /// Aggregate records emitted but not sealed when the checkpoint was taken.
    pub pending: Vec<(Stream, Record)>,
}

/// Why a stored checkpoint was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CheckpointError {
    #[error("not a citygate checkpoint")]
    Format,
    #[error("written under pseudonym key epoch {found}, the key now is epoch {current}")]
    OtherEpoch { found: u32, current: u32 },
    #[error("does not decrypt under the gateway's key (damaged, or another key)")]
    Decrypt,
    #[error("does not decode: {0}")]
    Decode(String),
}

/// The key checkpoints are sealed with.
#[derive(Clone)]
pub(crate) struct CheckpointKey {
    aead: ChaCha20Poly1305,
    epoch: u32,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl CheckpointKey {
    /// Derived from the pseudonym key: HMAC-SHA256(key, context).
    pub(crate) fn derive(key: &PseudonymKey) -> CheckpointKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
            .expect("invariant: HMAC takes a key of any length");
        mac.update(CONTEXT);
        let bytes = mac.finalize().into_bytes();
        CheckpointKey {
            aead: ChaCha20Poly1305::new(Key::from_slice(&bytes)),
            epoch: key.epoch(),
        }
    }

    /// `MAGIC ‖ version ‖ epoch (u32 BE) ‖ nonce ‖ ciphertext` of the zstd-compressed
    /// encoding; the header is authenticated.
    pub(crate) fn seal(&self, checkpoint: &Checkpoint) -> Vec<u8> {
        let encoded = bincode::serde::encode_to_vec(checkpoint, bincode::config::standard())
            .expect("invariant: a checkpoint encodes");
        let plain = zstd::bulk::compress(&encoded, ZSTD_LEVEL)
            .expect("invariant: zstd compresses in memory");
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(9 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        let header_len = out.len();
        let ct = self
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &out[..header_len],
                },
            )
            .expect("invariant: ChaCha20-Poly1305 encrypts any length in memory");
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub(crate) fn open(&self, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        if bytes.len() < 9 + NONCE_LEN || &bytes[..4] != MAGIC || bytes[4] != VERSION {
            return Err(CheckpointError::Format);
        }
        let found = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        if found != self.epoch {
            return Err(CheckpointError::OtherEpoch {
                found,
                current: self.epoch,
            });
        }
        let (header, rest) = bytes.split_at(9);
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let plain = self
            .aead
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: header,
                },
            )
            .map_err(|_| CheckpointError::Decrypt)?;
        let plain = zstd::bulk::decompress(&plain, MAX_PLAIN)
            .map_err(|e| CheckpointError::Decode(e.to_string()))?;
        let (cp, _) = bincode::serde::decode_from_slice(&plain, bincode::config::standard())
            .map_err(|e| CheckpointError::Decode(e.to_string()))?;
        Ok(cp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp() -> Checkpoint {
        Checkpoint {
            taken_ms: 1,
            flows: Vec::new(),
            pending: Vec::new(),
        }
    }

    #[test]
    fn a_checkpoint_opens_only_under_its_key_and_epoch_and_unchanged() {
        let key = PseudonymKey::from_bytes([7; 32]);
        let k = CheckpointKey::derive(&key);
        let sealed = k.seal(&cp());
        assert_eq!(k.open(&sealed).unwrap(), cp());
        let other = CheckpointKey::derive(&PseudonymKey::from_bytes([8; 32]));
        assert_eq!(other.open(&sealed), Err(CheckpointError::Decrypt));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(k.open(&flipped), Err(CheckpointError::Decrypt));
        let mut epoch = sealed.clone();
        epoch[8] = 9;
        assert!(matches!(
            k.open(&epoch),
            Err(CheckpointError::OtherEpoch {
                found: 9,
                current: 0
            })
        ));
        assert_eq!(k.open(b"garbage"), Err(CheckpointError::Format));
    }
}

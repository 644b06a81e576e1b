//! Both roles' keys in one folder: the fixture of the tests (`tests/support`'s `Deployment`,
//! the unit tests of `seal` and `hub`), reached as `keys::generate`. Nothing in the product
//! writes both roles into one folder: `citygate keys gen` writes one role
//! ([`generate_role`](crate::seal::roles::generate_role)), `demo` and `loadtest` one folder per role
//! ([`generate_one_box`](crate::seal::handover::generate_one_box)).

use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use crate::seal::key_types::{key_id, HubSecretKey, PseudonymKey};

use super::{
    create_key_dir, sync_dir, write_key_file, KeyError, KeyKind, HUB_ACK_PUBLIC_FILE,
    HUB_ACK_SECRET_FILE, HUB_PUBLIC_KEY_FILE, HUB_SECRET_KEY_FILE, PSEUDONYM_KEY_FILE,
    SIGNING_KEY_FILE, VERIFYING_KEY_FILE,
};

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKeys {
    pub signing_key: PathBuf,
    pub verifying_key: PathBuf,
    pub hub_secret_key: PathBuf,
    pub hub_public_key: PathBuf,
    pub pseudonym_key: PathBuf,
    pub hub_ack_signing_key: PathBuf,
    pub hub_ack_verifying_key: PathBuf,
    /// Key id of the gateway verifying key (the envelope's `signer_key_id`).
    pub signer_key_id: [u8; 8],
    /// Key id of the hub public key (the envelope's `recipient_key_id`).
    pub hub_key_id: [u8; 8],
    /// Fingerprint of the pseudonym key.
    pub pseudonym_key_id: [u8; 8],
    /// Key id of the hub ack-verifying key (an ack's `key`).
    pub hub_ack_key_id: [u8; 8],
}

/// Generates a fresh gateway signing key pair, hub HPKE key pair, pseudonym key and hub
/// ack-signing key pair into `dir`: both roles in one folder, for tests only.
///
/// Creates `dir` (mode 0700) if needed. Unless `overwrite`, fails with [`KeyError::Exists`]
/// before writing anything if any of the seven files exists. With `overwrite`, each file is
/// replaced atomically (written to a temporary file in `dir`, then renamed).
pub fn generate(dir: &Path, overwrite: bool) -> Result<GeneratedKeys, KeyError> {
    create_key_dir(dir)?;
    let path = |name: &str| dir.join(name);
    let keys = GeneratedKeys {
        signing_key: path(SIGNING_KEY_FILE),
        verifying_key: path(VERIFYING_KEY_FILE),
        hub_secret_key: path(HUB_SECRET_KEY_FILE),
        hub_public_key: path(HUB_PUBLIC_KEY_FILE),
        pseudonym_key: path(PSEUDONYM_KEY_FILE),
        hub_ack_signing_key: path(HUB_ACK_SECRET_FILE),
        hub_ack_verifying_key: path(HUB_ACK_PUBLIC_FILE),
        signer_key_id: [0; 8],
        hub_key_id: [0; 8],
        pseudonym_key_id: [0; 8],
        hub_ack_key_id: [0; 8],
    };
    if !overwrite {
        for p in [
            &keys.signing_key,
            &keys.verifying_key,
            &keys.hub_secret_key,
            &keys.hub_public_key,
            &keys.pseudonym_key,
            &keys.hub_ack_signing_key,
            &keys.hub_ack_verifying_key,
        ] {
            if fs::symlink_metadata(p).is_ok() {
                return Err(KeyError::Exists { path: p.clone() });
            }
        }
    }

    let signing = SigningKey::generate(&mut OsRng);
    let verifying = signing.verifying_key();
    let hub_secret = HubSecretKey::generate(&mut OsRng);
    let hub_public = hub_secret.public_key();
    let pseudonym = PseudonymKey::generate(&mut OsRng);
    let ack_signing = SigningKey::generate(&mut OsRng);
    let ack_verifying = ack_signing.verifying_key();

    let signing_bytes = Zeroizing::new(signing.to_bytes());
    write_key_file(
        &keys.signing_key,
        KeyKind::GatewaySigning,
        &signing_bytes,
        overwrite,
    )?;
    write_key_file(
        &keys.verifying_key,
        KeyKind::GatewayVerifying,
        verifying.as_bytes(),
        overwrite,
    )?;
    write_key_file(
        &keys.hub_secret_key,
        KeyKind::HubHpkeSecret,
        &hub_secret.to_secret_bytes(),
        overwrite,
    )?;
    write_key_file(
        &keys.hub_public_key,
        KeyKind::HubHpkePublic,
        &hub_public.to_bytes(),
        overwrite,
    )?;
    write_key_file(
        &keys.pseudonym_key,
        KeyKind::Pseudonym,
        pseudonym.as_bytes(),
        overwrite,
    )?;
    let ack_signing_bytes = Zeroizing::new(ack_signing.to_bytes());
    write_key_file(
        &keys.hub_ack_signing_key,
        KeyKind::HubAckSigning,
        &ack_signing_bytes,
        overwrite,
    )?;
    write_key_file(
        &keys.hub_ack_verifying_key,
        KeyKind::HubAckVerifying,
        ack_verifying.as_bytes(),
        overwrite,
    )?;
    sync_dir(dir)?;

    Ok(GeneratedKeys {
        signer_key_id: key_id(verifying.as_bytes()),
        hub_key_id: hub_public.key_id(),
        pseudonym_key_id: pseudonym.key_id(),
        hub_ack_key_id: key_id(ack_verifying.as_bytes()),
        ..keys
    })
}

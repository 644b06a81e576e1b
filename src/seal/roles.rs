//! Key roles and fingerprints: what `citygate keys gen --role` writes, and how an operator
//! compares keys across boxes.
//!
//! | role      | secret files (0600)                 | public files (0644)            |
//! |-----------|-------------------------------------|--------------------------------|
//! | `gateway` | `gateway.sign.key`, `pseudonym.key` | `gateway.sign.pub`             |
//! | `hub`     | `hub.hpke.key`, `hub.ack.key`       | `hub.hpke.pub`, `hub.ack.pub`  |
//!
//! A folder holds the secrets of one role only: [`generate_role`] refuses a folder that holds
//! the other role's secret keys (with or without overwrite), so the hub's HPKE and ack-signing
//! keys never exist on a gateway, and a gateway's signing and pseudonym keys never on the hub.
//! A gateway folder does hold the hub's *public* keys once imported (`handover.rs`).
//!
//! A [`Fingerprint`] is SHA-256 of a raw 32-byte public key, printed as 16 groups of four hex
//! digits for reading aloud; its first four groups are the key id logs and envelopes carry. A
//! secret key of a pair is shown by its public half's fingerprint; the pseudonym key, which has
//! no public half, only by its key id and epoch ([`inspect`]).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::key_types::{HubSecretKey, PseudonymKey};
use super::keys::{
    create_key_dir, read_any_key_file, sync_dir, write_key_file, KeyError, KeyKind,
    HUB_ACK_PUBLIC_FILE, HUB_ACK_SECRET_FILE, HUB_PUBLIC_KEY_FILE, HUB_SECRET_KEY_FILE,
    PSEUDONYM_KEY_FILE, SIGNING_KEY_FILE, VERIFYING_KEY_FILE,
};

/// Whose keys: a gateway's or the hub's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Hub,
}

impl Role {
    /// The role a key kind belongs to.
    pub fn of(kind: KeyKind) -> Role {
        match kind {
            KeyKind::GatewaySigning | KeyKind::GatewayVerifying | KeyKind::Pseudonym => {
                Role::Gateway
            }
            KeyKind::HubHpkeSecret
            | KeyKind::HubHpkePublic
            | KeyKind::HubAckSigning
            | KeyKind::HubAckVerifying => Role::Hub,
        }
    }

    /// `gateway` or `hub`, as on the command line and in export files.
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Hub => "hub",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "gateway" => Some(Role::Gateway),
            "hub" => Some(Role::Hub),
            _ => None,
        }
    }

    pub fn other(self) -> Role {
        match self {
            Role::Gateway => Role::Hub,
            Role::Hub => Role::Gateway,
        }
    }

    /// The secret files of this role, with their kinds.
    pub(crate) fn secret_files(self) -> [(&'static str, KeyKind); 2] {
        match self {
            Role::Gateway => [
                (SIGNING_KEY_FILE, KeyKind::GatewaySigning),
                (PSEUDONYM_KEY_FILE, KeyKind::Pseudonym),
            ],
            Role::Hub => [
                (HUB_SECRET_KEY_FILE, KeyKind::HubHpkeSecret),
                (HUB_ACK_SECRET_FILE, KeyKind::HubAckSigning),
            ],
        }
    }

    /// The public keys this role hands over, with the file names a receiving folder uses
    /// (a gateway's key is named after the gateway at the hub instead).
    pub(crate) fn public_kinds(self) -> &'static [(KeyKind, &'static str)] {
        match self {
            Role::Gateway => &[(KeyKind::GatewayVerifying, VERIFYING_KEY_FILE)],
            Role::Hub => &[
                (KeyKind::HubHpkePublic, HUB_PUBLIC_KEY_FILE),
                (KeyKind::HubAckVerifying, HUB_ACK_PUBLIC_FILE),
            ],
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// SHA-256 of a raw 32-byte public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub(crate) [u8; 32]);

impl Fingerprint {
    pub fn of(public: &[u8; 32]) -> Fingerprint {
        Fingerprint(Sha256::digest(public).into())
    }
}

impl fmt::Display for Fingerprint {
    /// `3b6a 27bc …`: 16 groups of four lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pair) in self.0.chunks(2).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}", hex::encode(pair))?;
        }
        Ok(())
    }
}

/// One key file as [`inspect`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub path: PathBuf,
    pub kind: KeyKind,
    pub role: Role,
    /// The public key (a secret key's public half); `None` for the pseudonym key.
    pub public: Option<[u8; 32]>,
    /// The pseudonym key's key id and epoch.
    pub pseudonym: Option<([u8; 8], u32)>,
}

impl KeyInfo {
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        self.public.as_ref().map(Fingerprint::of)
    }
}

/// Reads a key file of any kind (secret files permission-checked) and derives what can be
/// shown of it.
pub fn inspect(path: &Path) -> Result<KeyInfo, KeyError> {
    let (kind, bytes, epoch) = read_any_key_file(path, None)?;
    let (public, pseudonym) = match kind {
        KeyKind::GatewaySigning | KeyKind::HubAckSigning => (
            Some(SigningKey::from_bytes(&bytes).verifying_key().to_bytes()),
            None,
        ),
        KeyKind::HubHpkeSecret => (
            Some(HubSecretKey::from_bytes(&bytes).public_key().to_bytes()),
            None,
        ),
        KeyKind::Pseudonym => (
            None,
            Some((PseudonymKey::from_bytes(*bytes).key_id(), epoch)),
        ),
        KeyKind::GatewayVerifying | KeyKind::HubHpkePublic | KeyKind::HubAckVerifying => {
            (Some(*bytes), None)
        }
    };
    Ok(KeyInfo {
        path: path.to_owned(),
        kind,
        role: Role::of(kind),
        public,
        pseudonym,
    })
}

/// What [`generate_role`] wrote: every file with its kind and what can be shown of it.
#[derive(Debug, Clone)]
pub struct RoleKeys {
    pub role: Role,
    pub files: Vec<KeyInfo>,
}

/// Refuses a folder that holds `role`'s opposite's secret keys.
pub(crate) fn refuse_other_role(dir: &Path, role: Role, doing: &str) -> Result<(), KeyError> {
    let found: Vec<&str> = role
        .other()
        .secret_files()
        .iter()
        .filter(|(name, _)| fs::symlink_metadata(dir.join(name)).is_ok())
        .map(|(name, _)| *name)
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(KeyError::Refused {
        path: dir.to_owned(),
        reason: format!(
            "holds the {other}'s secret key{s} {list}; {doing} needs a folder of the {role}'s own. \
             A {other}'s secret keys belong on the {other} only: move them there (or destroy \
             them) first",
            other = role.other(),
            s = if found.len() > 1 { "s" } else { "" },
            list = found.join(", "),
        ),
    })
}

/// Generates the keys of one `role` into `dir` (created 0700): a gateway's signing key pair and
/// pseudonym key, or the hub's HPKE key pair and ack-signing key pair.
///
/// Refuses a `dir` holding the other role's secret keys, even with `overwrite`. Unless
/// `overwrite`, fails with [`KeyError::Exists`] before writing anything if a file of the role
/// exists; with it, each file is replaced atomically.
pub fn generate_role(dir: &Path, role: Role, overwrite: bool) -> Result<RoleKeys, KeyError> {
    refuse_other_role(dir, role, "`keys gen`")?;
    let (names, _): (Vec<&str>, Vec<KeyKind>) = match role {
        Role::Gateway => [
            (SIGNING_KEY_FILE, KeyKind::GatewaySigning),
            (VERIFYING_KEY_FILE, KeyKind::GatewayVerifying),
            (PSEUDONYM_KEY_FILE, KeyKind::Pseudonym),
        ]
        .into_iter()
        .unzip(),
        Role::Hub => [
            (HUB_SECRET_KEY_FILE, KeyKind::HubHpkeSecret),
            (HUB_PUBLIC_KEY_FILE, KeyKind::HubHpkePublic),
            (HUB_ACK_SECRET_FILE, KeyKind::HubAckSigning),
            (HUB_ACK_PUBLIC_FILE, KeyKind::HubAckVerifying),
        ]
        .into_iter()
        .unzip(),
    };
    if !overwrite {
        for name in &names {
            let p = dir.join(name);
            if fs::symlink_metadata(&p).is_ok() {
                return Err(KeyError::Exists { path: p });
            }
        }
    }
    create_key_dir(dir)?;
    let write = |name: &str, kind: KeyKind, key: &[u8; 32]| {
        write_key_file(&dir.join(name), kind, key, overwrite)
    };
    match role {
        Role::Gateway => {
            let signing = SigningKey::generate(&mut OsRng);
            let pseudonym = PseudonymKey::generate(&mut OsRng);
            write(
                SIGNING_KEY_FILE,
                KeyKind::GatewaySigning,
                &Zeroizing::new(signing.to_bytes()),
            )?;
            write(
                VERIFYING_KEY_FILE,
                KeyKind::GatewayVerifying,
                signing.verifying_key().as_bytes(),
            )?;
            write(PSEUDONYM_KEY_FILE, KeyKind::Pseudonym, pseudonym.as_bytes())?;
        }
        Role::Hub => {
            let hpke = HubSecretKey::generate(&mut OsRng);
            let ack = SigningKey::generate(&mut OsRng);
            write(
                HUB_SECRET_KEY_FILE,
                KeyKind::HubHpkeSecret,
                &hpke.to_secret_bytes(),
            )?;
            write(
                HUB_PUBLIC_KEY_FILE,
                KeyKind::HubHpkePublic,
                &hpke.public_key().to_bytes(),
            )?;
            write(
                HUB_ACK_SECRET_FILE,
                KeyKind::HubAckSigning,
                &Zeroizing::new(ack.to_bytes()),
            )?;
            write(
                HUB_ACK_PUBLIC_FILE,
                KeyKind::HubAckVerifying,
                ack.verifying_key().as_bytes(),
            )?;
        }
    }
    sync_dir(dir)?;
    let files = names
        .iter()
        .map(|n| inspect(&dir.join(n)))
        .collect::<Result<_, _>>()?;
    Ok(RoleKeys { role, files })
}

//! Key files: generating, writing and loading them.
//!
//! A key file is text: a first line naming its kind, then one line of lowercase hex (32 bytes,
//! 64 hex digits), e.g.
//!
//! ```text
//! # citygate gateway-signing-key v1
//! 9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60
//! ```
//!
//! | file               | kind tag                        | content                         | mode |
//! |--------------------|---------------------------------|---------------------------------|------|
//! | `gateway.sign.key` | `gateway-signing-key v1`        | Ed25519 secret seed (RFC 8032)  | 0600 |
//! | `gateway.sign.pub` | `gateway-verifying-key v1`      | Ed25519 public key              | 0644 |
//! | `hub.hpke.key`     | `hub-hpke-secret-key v1`        | X25519 secret key (RFC 7748)    | 0600 |
//! | `hub.hpke.pub`     | `hub-hpke-public-key v1`        | X25519 public key               | 0644 |
//! | `pseudonym.key`    | `pseudonym-key v1`              | 32 random bytes (HMAC key)      | 0600 |
//! | `hub.ack.key`      | `hub-ack-signing-key v1`        | Ed25519 secret seed: signs acks | 0600 |
//! | `hub.ack.pub`      | `hub-ack-verifying-key v1`      | Ed25519 public key              | 0644 |
//!
//! A pseudonym key file may carry an `epoch N` line between the two (N = 0 when absent): the
//! number of rotations before this key ([`rotate_pseudonym_key`]).
//!
//! Loading checks the kind tag, so a hub key configured where the signing key belongs fails
//! with an error naming the file, the kind expected and the kind found. On unix, secret files
//! must not be accessible to group or others (`mode & 0o077 == 0`), checked on the opened file.
//! Generating ([`generate_role`](super::roles::generate_role), one role per folder; [`generate`],
//! both, for tests) creates the directory with mode 0700 and the secret files with mode 0600 at
//! creation (never chmod after writing), and refuses to replace existing files unless told to.
//!
//! Errors name the file and say what to do. File contents are held in zeroizing buffers while
//! parsed; the key types themselves are in `key_types.rs`, roles and fingerprints in
//! `roles.rs`.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use super::key_types::{HubPublicKey, HubSecretKey, PseudonymKey};

mod both_roles;
pub use both_roles::{generate, GeneratedKeys};

/// The key files' names.
pub(crate) const SIGNING_KEY_FILE: &str = "gateway.sign.key";
pub(crate) const VERIFYING_KEY_FILE: &str = "gateway.sign.pub";
pub(crate) const HUB_SECRET_KEY_FILE: &str = "hub.hpke.key";
pub(crate) const HUB_PUBLIC_KEY_FILE: &str = "hub.hpke.pub";
pub(crate) const PSEUDONYM_KEY_FILE: &str = "pseudonym.key";
pub(crate) const HUB_ACK_SECRET_FILE: &str = "hub.ack.key";
pub(crate) const HUB_ACK_PUBLIC_FILE: &str = "hub.ack.pub";

/// Key files are tiny; anything longer is not a key file and is not read further.
const MAX_KEY_FILE_BYTES: u64 = 4096;
const SECRET_FILE_MODE: u32 = 0o600;
const PUBLIC_FILE_MODE: u32 = 0o644;
const KEY_DIR_MODE: u32 = 0o700;

/// The kinds of key file, named by their first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    GatewaySigning,
    GatewayVerifying,
    HubHpkeSecret,
    HubHpkePublic,
    Pseudonym,
    HubAckSigning,
    HubAckVerifying,
}

impl KeyKind {
    pub(crate) const ALL: [KeyKind; 7] = [
        KeyKind::GatewaySigning,
        KeyKind::GatewayVerifying,
        KeyKind::HubHpkeSecret,
        KeyKind::HubHpkePublic,
        KeyKind::Pseudonym,
        KeyKind::HubAckSigning,
        KeyKind::HubAckVerifying,
    ];

    /// The first line of a file of this kind.
    pub(crate) fn tag_line(self) -> &'static str {
        match self {
            KeyKind::GatewaySigning => "# citygate gateway-signing-key v1",
            KeyKind::GatewayVerifying => "# citygate gateway-verifying-key v1",
            KeyKind::HubHpkeSecret => "# citygate hub-hpke-secret-key v1",
            KeyKind::HubHpkePublic => "# citygate hub-hpke-public-key v1",
            KeyKind::Pseudonym => "# citygate pseudonym-key v1",
            KeyKind::HubAckSigning => "# citygate hub-ack-signing-key v1",
            KeyKind::HubAckVerifying => "# citygate hub-ack-verifying-key v1",
        }
    }

    /// The kind's name in tag lines and public-key exports, e.g. `hub-hpke-public-key`.
    pub(crate) fn slug(self) -> &'static str {
        self.tag_line()
            .strip_prefix("# citygate ")
            .and_then(|t| t.strip_suffix(" v1"))
            .expect("invariant: tag lines are `# citygate {slug} v1`")
    }

    /// Whether files of this kind hold secrets (mode 0600, permission-checked on load).
    pub(crate) fn is_secret(self) -> bool {
        matches!(
            self,
            KeyKind::GatewaySigning
                | KeyKind::HubHpkeSecret
                | KeyKind::Pseudonym
                | KeyKind::HubAckSigning
        )
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::GatewaySigning => "gateway signing key",
            KeyKind::GatewayVerifying => "gateway verifying key",
            KeyKind::HubHpkeSecret => "hub HPKE secret key",
            KeyKind::HubHpkePublic => "hub HPKE public key",
            KeyKind::Pseudonym => "pseudonym key",
            KeyKind::HubAckSigning => "hub ack-signing key",
            KeyKind::HubAckVerifying => "hub ack-verifying key",
        })
    }
}

/// Why a key file could not be loaded or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing to overwrite existing key file {}; move it away first, or pass --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("key file {} holds a {found}, but a {expected} is expected here", path.display())]
    WrongKind {
        path: PathBuf,
        expected: KeyKind,
        found: KeyKind,
    },
    #[error("key file {} is malformed: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "secret key file {} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {} does not hold a valid {kind}: {reason}", path.display())]
    InvalidKey {
        path: PathBuf,
        kind: KeyKind,
        reason: String,
    },
    /// Key roles and hand-over: a folder or export that mixes roles, holds a secret, or
    /// does not match its fingerprints.
    #[error("{}: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads the gateway's Ed25519 signing key.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let bytes = read_key_file(path, KeyKind::GatewaySigning)?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Loads a gateway's Ed25519 verifying key (at the hub, one per registered gateway).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let bytes = read_key_file(path, KeyKind::GatewayVerifying)?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::InvalidKey {
        path: path.to_owned(),
        kind: KeyKind::GatewayVerifying,
        reason: e.to_string(),
    })
}

/// Loads the hub's HPKE public key (at the gateway).
pub fn load_hub_public_key(path: &Path) -> Result<HubPublicKey, KeyError> {
    let bytes = read_key_file(path, KeyKind::HubHpkePublic)?;
    Ok(HubPublicKey::from_bytes(&bytes))
}

/// Loads the hub's HPKE secret key (at the hub).
pub fn load_hub_secret_key(path: &Path) -> Result<HubSecretKey, KeyError> {
    let bytes = read_key_file(path, KeyKind::HubHpkeSecret)?;
    Ok(HubSecretKey::from_bytes(&bytes))
}

/// Loads the hub's Ed25519 ack-signing key (at the hub).
pub fn load_hub_ack_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let bytes = read_key_file(path, KeyKind::HubAckSigning)?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Loads the hub's Ed25519 ack-verifying key (at the gateway).
pub fn load_hub_ack_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let bytes = read_key_file(path, KeyKind::HubAckVerifying)?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::InvalidKey {
        path: path.to_owned(),
        kind: KeyKind::HubAckVerifying,
        reason: e.to_string(),
    })
}

/// Loads the gateway's pseudonym key with its epoch.
pub(crate) fn load_pseudonym_key(path: &Path) -> Result<PseudonymKey, KeyError> {
    let (bytes, epoch) = read_key_file_with_epoch(path, KeyKind::Pseudonym)?;
    Ok(PseudonymKey::from_bytes(*bytes).with_epoch(epoch))
}

/// What [`rotate_pseudonym_key`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub old_epoch: u32,
    pub old_key_id: [u8; 8],
    pub new_epoch: u32,
    pub new_key_id: [u8; 8],
}

/// Replaces the pseudonym key at `path` with a fresh random key of the next epoch, atomically
/// (temporary file, fsync, rename, directory fsync). The old key is gone afterwards: pseudonyms
/// of the new epoch cannot be linked to the old ones on the box. A running gateway uses the
/// new key from its next start.
pub fn rotate_pseudonym_key(path: &Path) -> Result<Rotation, KeyError> {
    let old = load_pseudonym_key(path)?;
    let new_epoch = old
        .epoch()
        .checked_add(1)
        .ok_or_else(|| KeyError::Malformed {
            path: path.to_owned(),
            reason: "the epoch cannot grow further".to_owned(),
        })?;
    let new = PseudonymKey::generate(&mut OsRng).with_epoch(new_epoch);
    write_key_file_with(
        path,
        KeyKind::Pseudonym,
        new.as_bytes(),
        Some(new_epoch),
        true,
    )?;
    if let Some(dir) = path.parent() {
        sync_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })?;
    }
    Ok(Rotation {
        old_epoch: old.epoch(),
        old_key_id: old.key_id(),
        new_epoch,
        new_key_id: new.key_id(),
    })
}

/// Reads, permission-checks and parses a key file of the expected kind.
fn read_key_file(path: &Path, expected: KeyKind) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let (bytes, epoch) = read_key_file_with_epoch(path, expected)?;
    if epoch != 0 {
        return Err(KeyError::Malformed {
            path: path.to_owned(),
            reason: "only a pseudonym key has an epoch line".to_owned(),
        });
    }
    Ok(bytes)
}

/// [`read_key_file`] that also accepts an `epoch N` line before the key (pseudonym keys).
fn read_key_file_with_epoch(
    path: &Path,
    expected: KeyKind,
) -> Result<(Zeroizing<[u8; 32]>, u32), KeyError> {
    read_any_key_file(path, Some(expected)).map(|(_, bytes, epoch)| (bytes, epoch))
}

/// Reads a key file of any kind (or of `expected`): its kind, key and epoch. Secret files are
/// permission-checked on the opened file.
pub(super) fn read_any_key_file(
    path: &Path,
    expected: Option<KeyKind>,
) -> Result<(KeyKind, Zeroizing<[u8; 32]>, u32), KeyError> {
    let file = File::open(path).map_err(io_error(path))?;
    if expected.is_some_and(KeyKind::is_secret) {
        check_private(path, &file)?;
    }
    let mut text = Zeroizing::new(String::new());
    (&file)
        .take(MAX_KEY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io_error(path))?;
    let malformed = |reason: String| KeyError::Malformed {
        path: path.to_owned(),
        reason,
    };
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(malformed(format!("longer than {MAX_KEY_FILE_BYTES} bytes")));
    }
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let tag = lines.next().unwrap_or_default();
    let Some(found) = KeyKind::ALL.into_iter().find(|k| k.tag_line() == tag) else {
        let wanted = expected.map_or("# citygate KIND v1", KeyKind::tag_line);
        return Err(malformed(format!(
            "first line should be `{wanted}`; is this a citygate key file?"
        )));
    };
    let expected = match expected {
        Some(expected) if found != expected => {
            return Err(KeyError::WrongKind {
                path: path.to_owned(),
                expected,
                found,
            })
        }
        Some(expected) => expected,
        None => {
            if found.is_secret() {
                check_private(path, &file)?;
            }
            found
        }
    };
    let mut hex_line = lines
        .next()
        .ok_or_else(|| malformed("no key after the first line".to_owned()))?;
    let mut epoch = 0;
    if let Some(n) = hex_line.strip_prefix("epoch ") {
        if expected != KeyKind::Pseudonym {
            return Err(malformed(
                "only a pseudonym key has an epoch line".to_owned(),
            ));
        }
        epoch = n
            .parse()
            .map_err(|_| malformed(format!("`epoch {n}`: the epoch must be 0..=4294967295")))?;
        hex_line = lines
            .next()
            .ok_or_else(|| malformed("no key after the epoch line".to_owned()))?;
    }
    if lines.next().is_some() {
        return Err(malformed("more than one key line".to_owned()));
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_line, &mut bytes[..])
        .map_err(|_| malformed("the key line must be 64 hex digits (32 bytes)".to_owned()))?;
    Ok((found, bytes, epoch))
}

#[cfg(unix)]
fn check_private(path: &Path, file: &File) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .map_err(io_error(path))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _file: &File) -> Result<(), KeyError> {
    Ok(())
}

pub(super) fn create_key_dir(dir: &Path) -> Result<(), KeyError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(KEY_DIR_MODE);
    }
    builder.create(dir).map_err(io_error(dir))
}

pub(super) fn write_key_file(
    path: &Path,
    kind: KeyKind,
    key: &[u8; 32],
    overwrite: bool,
) -> Result<(), KeyError> {
    write_key_file_with(path, kind, key, None, overwrite)
}

fn write_key_file_with(
    path: &Path,
    kind: KeyKind,
    key: &[u8; 32],
    epoch: Option<u32>,
    overwrite: bool,
) -> Result<(), KeyError> {
    let mut text = Zeroizing::new(String::with_capacity(kind.tag_line().len() + 84));
    text.push_str(kind.tag_line());
    text.push('\n');
    if let Some(epoch) = epoch {
        text.push_str(&format!("epoch {epoch}\n"));
    }
    text.push_str(&Zeroizing::new(hex::encode(key)));
    text.push('\n');
    let mode = if kind.is_secret() {
        SECRET_FILE_MODE
    } else {
        PUBLIC_FILE_MODE
    };
    if !overwrite {
        return write_new_file(path, text.as_bytes(), mode);
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&tmp)(e)),
    }
    write_new_file(&tmp, text.as_bytes(), mode)?;
    fs::rename(&tmp, path).map_err(io_error(path))
}

/// Creates `path` (which must not exist) with `mode` from the start, writes and syncs it.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_owned(),
            }
        } else {
            io_error(path)(e)
        }
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error(path))
}

#[cfg(unix)]
pub(super) fn sync_dir(dir: &Path) -> Result<(), KeyError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

#[cfg(not(unix))]
pub(super) fn sync_dir(_dir: &Path) -> Result<(), KeyError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::key_id;

    /// Issue 11 item 9: a rotation moves to the next epoch with a fresh key, replaces the file
    /// atomically with its mode kept private, and the epoch survives loading.
    #[test]
    fn rotating_the_pseudonym_key_moves_to_a_fresh_key_of_the_next_epoch() {
        let (_tmp, dir) = keydir();
        let g = generate(&dir, false).unwrap();
        let first = load_pseudonym_key(&g.pseudonym_key).unwrap();
        assert_eq!(first.epoch(), 0);
        let r = rotate_pseudonym_key(&g.pseudonym_key).unwrap();
        assert_eq!((r.old_epoch, r.new_epoch), (0, 1));
        assert_eq!(r.old_key_id, first.key_id());
        let second = load_pseudonym_key(&g.pseudonym_key).unwrap();
        assert_eq!((second.epoch(), second.key_id()), (1, r.new_key_id));
        assert_ne!(second.as_bytes(), first.as_bytes());
        let r = rotate_pseudonym_key(&g.pseudonym_key).unwrap();
        assert_eq!((r.old_epoch, r.new_epoch), (1, 2));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&g.pseudonym_key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{second:?}").contains(&hex::encode(second.as_bytes())));
        // Only pseudonym keys may carry an epoch.
        let text = fs::read_to_string(&g.pseudonym_key).unwrap();
        assert!(text.contains("\nepoch 2\n"), "{text}");
        let signing = fs::read_to_string(&g.signing_key).unwrap();
        let (tag, key) = signing.split_once('\n').unwrap();
        fs::remove_file(&g.signing_key).unwrap();
        write_new_file(
            &g.signing_key,
            format!("{tag}\nepoch 1\n{key}").as_bytes(),
            0o600,
        )
        .unwrap();
        assert!(load_signing_key(&g.signing_key).is_err());
    }

    fn keydir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        (tmp, dir)
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generate_then_load_all() {
        let (_tmp, dir) = keydir();
        let g = generate(&dir, false).unwrap();
        let signing = load_signing_key(&g.signing_key).unwrap();
        let verifying = load_verifying_key(&g.verifying_key).unwrap();
        let hub_secret = load_hub_secret_key(&g.hub_secret_key).unwrap();
        let hub_public = load_hub_public_key(&g.hub_public_key).unwrap();
        let pseudonym = load_pseudonym_key(&g.pseudonym_key).unwrap();
        assert_eq!(signing.verifying_key(), verifying);
        assert_eq!(hub_secret.public_key(), hub_public);
        assert_eq!(g.signer_key_id, key_id(verifying.as_bytes()));
        assert_eq!(g.hub_key_id, hub_public.key_id());
        assert_eq!(g.pseudonym_key_id, pseudonym.key_id());
        let ack_signing = load_hub_ack_signing_key(&g.hub_ack_signing_key).unwrap();
        let ack_verifying = load_hub_ack_verifying_key(&g.hub_ack_verifying_key).unwrap();
        assert_eq!(ack_signing.verifying_key(), ack_verifying);
        assert_eq!(g.hub_ack_key_id, key_id(ack_verifying.as_bytes()));
        assert_eq!(mode(&g.hub_ack_signing_key), 0o600);

        // The loaded keys work together.
        let gateway = crate::reading::GatewayId::new("gw-keys").unwrap();
        let sealer = super::super::Sealer::new(gateway.clone(), signing, hub_public.clone(), 1);
        let mut opener = super::super::Opener::new(hub_secret);
        opener.register(gateway, verifying);
        let batch = sealer
            .seal(
                crate::reading::Stream::Audit,
                1,
                0,
                &super::super::PolicyStamp::gateway(),
                &[],
            )
            .unwrap();
        assert!(opener.open(&batch.bytes).is_ok());

        let text = fs::read_to_string(&g.hub_public_key).unwrap();
        assert_eq!(
            text,
            format!(
                "# citygate hub-hpke-public-key v1\n{}\n",
                hex::encode(hub_public.to_bytes())
            )
        );

        #[cfg(unix)]
        {
            assert_eq!(mode(&dir), 0o700);
            for p in [&g.signing_key, &g.hub_secret_key, &g.pseudonym_key] {
                assert_eq!(mode(p), 0o600, "{}", p.display());
            }
            for p in [&g.verifying_key, &g.hub_public_key] {
                assert_eq!(
                    mode(p) & 0o033,
                    0,
                    "{} is not group/other writable",
                    p.display()
                );
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn secret_file_readable_by_others_is_rejected() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, dir) = keydir();
        let g = generate(&dir, false).unwrap();
        fs::set_permissions(&g.signing_key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_signing_key(&g.signing_key).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("chmod 600 {}", g.signing_key.display())),
            "{msg}"
        );
        assert!(msg.contains("0644"), "{msg}");

        fs::set_permissions(&g.hub_secret_key, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_hub_secret_key(&g.hub_secret_key),
            Err(KeyError::Permissions { .. })
        ));
        fs::set_permissions(&g.pseudonym_key, fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(
            load_pseudonym_key(&g.pseudonym_key),
            Err(KeyError::Permissions { .. })
        ));
        // Public files may be world-readable.
        fs::set_permissions(&g.verifying_key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_verifying_key(&g.verifying_key).is_ok());
    }

    #[test]
    fn wrong_kind_of_key_file_is_rejected_with_a_clear_message() {
        let (_tmp, dir) = keydir();
        let g = generate(&dir, false).unwrap();
        let err = load_signing_key(&g.hub_secret_key).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::WrongKind {
                    expected: KeyKind::GatewaySigning,
                    found: KeyKind::HubHpkeSecret,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&g.hub_secret_key.display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains("hub HPKE secret key") && msg.contains("gateway signing key"),
            "{msg}"
        );
        assert!(matches!(
            load_hub_public_key(&g.verifying_key),
            Err(KeyError::WrongKind { .. })
        ));
    }

    #[test]
    fn malformed_key_files_are_rejected() {
        let (_tmp, dir) = keydir();
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.pub");
        let good_hex = hex::encode([7u8; 32]);
        for (content, needle) in [
            (String::new(), "first line"),
            (good_hex.clone(), "first line"),
            ("# citygate gateway-verifying-key v1\n".to_owned(), "no key"),
            (
                "# citygate gateway-verifying-key v1\nzz\n".to_owned(),
                "64 hex digits",
            ),
            (
                format!("# citygate gateway-verifying-key v1\n{}\n", &good_hex[..62]),
                "64 hex digits",
            ),
            (
                format!("# citygate gateway-verifying-key v1\n{good_hex}\n{good_hex}\n"),
                "more than one",
            ),
            ("x".repeat(5000), "longer than"),
        ] {
            fs::write(&path, &content).unwrap();
            let err = load_verifying_key(&path).unwrap_err();
            assert!(
                matches!(err, KeyError::Malformed { .. }),
                "{content:?}: {err:?}"
            );
            assert!(err.to_string().contains(needle), "{content:?}: {err}");
        }
        let missing = load_verifying_key(&dir.join("absent")).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
    }

    #[test]
    fn overwrite_is_refused_unless_asked() {
        let (_tmp, dir) = keydir();
        let first = generate(&dir, false).unwrap();
        let before = fs::read(&first.signing_key).unwrap();
        let err = generate(&dir, false).unwrap_err();
        match &err {
            KeyError::Exists { path } => assert_eq!(path, &first.signing_key),
            other => panic!("expected Exists, got {other:?}"),
        }
        assert!(err.to_string().contains("gateway.sign.key"), "{err}");
        assert_eq!(
            fs::read(&first.signing_key).unwrap(),
            before,
            "nothing was written"
        );

        let second = generate(&dir, true).unwrap();
        assert_ne!(second.signer_key_id, first.signer_key_id);
        assert_ne!(fs::read(&second.signing_key).unwrap(), before);
        assert!(load_signing_key(&second.signing_key).is_ok());
        #[cfg(unix)]
        assert_eq!(mode(&second.hub_secret_key), 0o600);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn secret_key_debug_shows_only_the_key_id() {
        let hub = HubSecretKey::from_bytes(&[0x11; 32]);
        let text = format!("{hub:?}");
        assert_eq!(
            text,
            format!(
                "HubSecretKey {{ key_id: \"{}\" }}",
                hex::encode(hub.key_id())
            )
        );
        let pseudonym = PseudonymKey::from_bytes([0x22; 32]);
        assert!(!format!("{pseudonym:?}").contains("2222"));
        assert_eq!(pseudonym.as_bytes(), &[0x22; 32]);
    }

    #[test]
    fn key_id_is_sha256_prefix() {
        // SHA-256 of 32 zero bytes starts 66687aadf862bd77.
        assert_eq!(hex::encode(key_id(&[0; 32])), "66687aadf862bd77");
    }
}

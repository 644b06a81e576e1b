//! Handing public keys from one box to another: the file `citygate keys export` writes and
//! `citygate keys import` reads.
//!
//! The hub hands its HPKE public key and ack-verifying key to every gateway; each gateway
//! hands its verifying key (with its id) to the hub's registry. The file is text, at most
//! 4 KiB, versioned, one item a line:
//!
//! ```text
//! # citygate public-keys v1
//! role hub
//! hub-hpke-public-key 5f1c…(64 hex digits)
//! fingerprint hub-hpke-public-key 9a0e 77c1 … (16 groups)
//! hub-ack-verifying-key …
//! fingerprint hub-ack-verifying-key …
//! ```
//!
//! A gateway's export says `role gateway`, then `gateway ID`, then its
//! `gateway-verifying-key` with its fingerprint. Reading refuses: anything but version 1; a
//! secret key, in any form (a key file's own tag line, or a secret kind's line); a key of the
//! other role or a missing one; a fingerprint that does not match its key (a changed or
//! damaged file). The fingerprints inside only catch damage: the operator compares the ones
//! `import` prints with `keys show` on the exporting box, over another channel.
//!
//! Importing refuses a folder that holds the exporting role's own secret keys (the hub's
//! export into the hub's folder, a gateway's export into a gateway's folder), and replaces
//! existing files only when asked (`--force`).

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::reading::GatewayId;

use super::keys::{create_key_dir, sync_dir, write_key_file, KeyError, KeyKind};
use super::roles::{inspect, Fingerprint, KeyInfo, Role};

/// The first line of an export file.
pub const EXPORT_TAG_LINE: &str = "# citygate public-keys v1";
const MAX_EXPORT_BYTES: u64 = 4096;

/// The public half of one role, as handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeys {
    pub role: Role,
    /// The gateway's id (role gateway only): the hub registers the key under it.
    pub gateway: Option<GatewayId>,
    pub keys: Vec<(KeyKind, [u8; 32])>,
}

fn refused(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Refused {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl PublicKeys {
    /// The public keys of the role whose secret keys `dir` holds, derived from those secret
    /// keys (so a stale `.pub` file cannot be handed over). A gateway's needs its id.
    pub fn from_dir(dir: &Path, gateway: Option<GatewayId>) -> Result<PublicKeys, KeyError> {
        let holds = |role: Role| {
            role.secret_files()
                .iter()
                .any(|(name, _)| fs::symlink_metadata(dir.join(name)).is_ok())
        };
        let role = match (holds(Role::Gateway), holds(Role::Hub)) {
            (true, true) => {
                return Err(refused(
                    dir,
                    "holds the secret keys of both roles (an older `keys gen`); move the hub's \
                     hub.hpke.key and hub.ack.key to the hub and export there",
                ))
            }
            (true, false) => Role::Gateway,
            (false, true) => Role::Hub,
            (false, false) => return Err(refused(
                dir,
                "holds no gateway or hub secret key; export where `citygate keys gen --role` ran",
            )),
        };
        match (role, &gateway) {
            (Role::Gateway, None) => {
                return Err(refused(
                    dir,
                    "holds a gateway's keys: name the gateway (--gateway ID, its [gateway] id), \
                     the hub registers the key under it",
                ))
            }
            (Role::Hub, Some(_)) => {
                return Err(refused(
                    dir,
                    "holds the hub's keys; --gateway is for a gateway's export",
                ))
            }
            _ => {}
        }
        let mut keys = Vec::new();
        for (name, kind) in role.secret_files() {
            if kind == KeyKind::Pseudonym {
                continue;
            }
            let info = inspect(&dir.join(name))?;
            let public = info
                .public
                .expect("invariant: signing and HPKE secret keys have a public half");
            let public_kind = match kind {
                KeyKind::GatewaySigning => KeyKind::GatewayVerifying,
                KeyKind::HubHpkeSecret => KeyKind::HubHpkePublic,
                _ => KeyKind::HubAckVerifying,
            };
            keys.push((public_kind, public));
        }
        Ok(PublicKeys {
            role,
            gateway,
            keys,
        })
    }

    /// The export file's text.
    pub fn encode(&self) -> String {
        let mut out = format!("{EXPORT_TAG_LINE}\nrole {}\n", self.role);
        if let Some(g) = &self.gateway {
            out.push_str(&format!("gateway {g}\n"));
        }
        for (kind, key) in &self.keys {
            out.push_str(&format!(
                "{slug} {hex}\nfingerprint {slug} {fp}\n",
                slug = kind.slug(),
                hex = hex::encode(key),
                fp = Fingerprint::of(key)
            ));
        }
        out
    }

    /// Reads and checks an export file.
    pub fn read(path: &Path) -> Result<PublicKeys, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        File::open(path)
            .map_err(io)?
            .take(MAX_EXPORT_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| KeyError::Io {
                path: path.to_owned(),
                source: e,
            })?;
        if text.len() as u64 > MAX_EXPORT_BYTES {
            return Err(refused(
                path,
                format!("longer than {MAX_EXPORT_BYTES} bytes; not a key export"),
            ));
        }
        Self::parse(path, &text)
    }

    /// Parses an export file's text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<PublicKeys, KeyError> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let first = lines.next().unwrap_or_default();
        if let Some(kind) = KeyKind::ALL.into_iter().find(|k| k.tag_line() == first) {
            return Err(refused(
                path,
                if kind.is_secret() {
                    format!(
                        "is a secret key file ({kind}): it never leaves its box. Hand over what \
                         `citygate keys export` writes"
                    )
                } else {
                    format!(
                        "is a single key file ({kind}); hand over what `citygate keys export` \
                         writes (it carries the role and fingerprints)"
                    )
                },
            ));
        }
        if first != EXPORT_TAG_LINE {
            let reason = if first.starts_with("# citygate public-keys ") {
                format!("unknown export version `{first}`; this citygate reads `{EXPORT_TAG_LINE}`")
            } else {
                format!("first line should be `{EXPORT_TAG_LINE}`; is this a key export?")
            };
            return Err(refused(path, reason));
        }
        let (mut role, mut gateway) = (None, None);
        let mut keys: Vec<(KeyKind, [u8; 32])> = Vec::new();
        let mut fingerprints: Vec<(KeyKind, String)> = Vec::new();
        let kind_of = |slug: &str| {
            KeyKind::ALL
                .into_iter()
                .find(|k| k.slug() == slug)
                .ok_or_else(|| refused(path, format!("unknown key kind `{slug}`")))
        };
        for line in lines {
            let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
            let rest = rest.trim();
            match word {
                "role" if role.is_none() => {
                    role = Some(Role::parse(rest).ok_or_else(|| {
                        refused(path, format!("role `{rest}`: valid roles are gateway, hub"))
                    })?);
                }
                "gateway" if gateway.is_none() => {
                    gateway = Some(
                        GatewayId::new(rest)
                            .map_err(|e| refused(path, format!("gateway `{rest}`: {e}")))?,
                    );
                }
                "fingerprint" => {
                    let (slug, fp) = rest.split_once(' ').unwrap_or((rest, ""));
                    fingerprints.push((kind_of(slug)?, fp.trim().to_owned()));
                }
                slug => {
                    let kind = kind_of(slug)?;
                    if kind.is_secret() {
                        return Err(refused(
                            path,
                            format!(
                                "holds a secret key ({kind}): secret keys never leave their box; \
                                 refusing the whole file. Destroy this copy"
                            ),
                        ));
                    }
                    if keys.iter().any(|(k, _)| *k == kind) {
                        return Err(refused(path, format!("{kind} appears twice")));
                    }
                    let mut key = [0u8; 32];
                    hex::decode_to_slice(rest, &mut key).map_err(|_| {
                        refused(path, format!("{kind}: the key must be 64 hex digits"))
                    })?;
                    keys.push((kind, key));
                }
            }
        }
        let role = role.ok_or_else(|| refused(path, "no `role` line"))?;
        for (kind, _) in &keys {
            if Role::of(*kind) != role {
                return Err(refused(
                    path,
                    format!("wrong role: a {role}'s export cannot carry a {kind}"),
                ));
            }
        }
        let mut ordered = Vec::new();
        for (kind, _) in role.public_kinds() {
            let key = keys
                .iter()
                .find(|(k, _)| k == kind)
                .ok_or_else(|| refused(path, format!("a {role}'s export lacks its {kind}")))?;
            let fp = Fingerprint::of(&key.1).to_string();
            match fingerprints.iter().find(|(k, _)| k == kind) {
                Some((_, written)) if *written == fp => {}
                Some(_) => {
                    return Err(refused(
                        path,
                        format!(
                            "the fingerprint of the {kind} does not match its key: the file was \
                             changed or damaged on the way; export it again"
                        ),
                    ))
                }
                None => return Err(refused(path, format!("no fingerprint for the {kind}"))),
            }
            ordered.push(*key);
        }
        match (role, &gateway) {
            (Role::Gateway, None) => {
                Err(refused(path, "a gateway's export lacks its `gateway` id"))
            }
            (Role::Hub, Some(_)) => Err(refused(path, "a hub's export has a `gateway` line")),
            _ => Ok(PublicKeys {
                role,
                gateway,
                keys: ordered,
            }),
        }
    }

    /// Where [`install`](Self::install) puts each key in `dir`.
    pub fn install_paths(&self, dir: &Path) -> Vec<(KeyKind, PathBuf)> {
        self.role
            .public_kinds()
            .iter()
            .map(|(kind, name)| {
                let path = match &self.gateway {
                    Some(g) => dir.join(format!("{g}.sign.pub")),
                    None => dir.join(name),
                };
                (*kind, path)
            })
            .collect()
    }

    /// Writes the keys where the receiving side's config expects them: a hub's into a
    /// gateway's key folder (`hub.hpke.pub`, `hub.ack.pub`), a gateway's into the hub's
    /// registry folder (`ID.sign.pub`). Refuses a folder holding the exporting role's secret
    /// keys; replaces existing files only with `overwrite`.
    pub fn install(&self, dir: &Path, overwrite: bool) -> Result<Vec<KeyInfo>, KeyError> {
        let own: Vec<&str> = self
            .role
            .secret_files()
            .iter()
            .filter(|(name, _)| fs::symlink_metadata(dir.join(name)).is_ok())
            .map(|(name, _)| *name)
            .collect();
        if !own.is_empty() {
            let (whose, goes) = match self.role {
                Role::Hub => ("the hub's own keys", "on each gateway"),
                Role::Gateway => ("a gateway's keys", "at the hub, into its registry folder"),
            };
            return Err(refused(
                dir,
                format!(
                    "holds {whose} ({}): wrong role for a {}'s export; import it {goes}",
                    own.join(", "),
                    self.role
                ),
            ));
        }
        let paths = self.install_paths(dir);
        if !overwrite {
            for (_, p) in &paths {
                if fs::symlink_metadata(p).is_ok() {
                    return Err(KeyError::Exists { path: p.clone() });
                }
            }
        }
        create_key_dir(dir)?;
        for ((kind, path), (_, key)) in paths.iter().zip(&self.keys) {
            write_key_file(path, *kind, key, overwrite)?;
        }
        sync_dir(dir)?;
        paths.iter().map(|(_, p)| inspect(p)).collect()
    }
}

/// A hub's and a gateway's keys on one machine, as the README's one-box recipe makes them:
/// each role in its own folder, the hub's public keys imported into the gateway's (for
/// `demo` and `loadtest`, which run both sides).
pub fn generate_one_box(hub_dir: &Path, gateway_dir: &Path) -> Result<(), KeyError> {
    super::roles::generate_role(hub_dir, Role::Hub, false)?;
    super::roles::generate_role(gateway_dir, Role::Gateway, false)?;
    PublicKeys::from_dir(hub_dir, None)?.install(gateway_dir, false)?;
    Ok(())
}

#[cfg(test)]
#[path = "handover_tests.rs"]
mod tests;

//! `citygate keys show|export|import`: listing key files with fingerprints and handing public
//! keys between the hub and its gateways (file format: `crate::seal::handover`).

use std::path::Path;

use super::key_error;
use crate::cli::CliError;
use crate::reading::GatewayId;
use crate::seal::handover::{PublicKeys, EXPORT_TAG_LINE};
use crate::seal::roles::{inspect, Fingerprint, KeyInfo, Role};

/// Key and export files are tiny; larger files in the folder are not looked at.
const MAX_LISTED_BYTES: u64 = 4096;

/// One line per key file: name, role, kind, fingerprint.
pub(super) fn print_key(info: &KeyInfo) {
    let name = info
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let what = match (info.fingerprint(), info.pseudonym) {
        (Some(fp), _) if info.kind.is_secret() => format!("{fp}  (of its public half)"),
        (Some(fp), _) => fp.to_string(),
        (None, Some((id, epoch))) => format!(
            "key id {}, epoch {epoch} (no public half; never leaves this box)",
            hex::encode(id)
        ),
        (None, None) => String::new(),
    };
    println!(
        "  {name:<22} {role:<8} {kind:<22} {what}",
        role = info.role,
        kind = info.kind.to_string()
    );
}

fn print_export(name: &str, keys: &PublicKeys) {
    for (kind, key) in &keys.keys {
        let who = match &keys.gateway {
            Some(g) => format!("gateway {g}"),
            None => keys.role.to_string(),
        };
        println!(
            "  {name:<22} {who:<8} {kind:<22} {}  (export)",
            Fingerprint::of(key),
            kind = kind.to_string()
        );
    }
}

/// `citygate keys show --dir DIR`
pub(super) fn show(dir: &Path) -> Result<(), CliError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() <= MAX_LISTED_BYTES))
        .collect();
    paths.sort();
    println!(
        "key files in {} (fingerprint: SHA-256 of the public key; its first 4 groups are the key id in logs):",
        dir.display()
    );
    let (mut listed, mut failed) = (0, 0);
    for path in paths {
        let text = std::fs::read(&path).unwrap_or_default();
        let first = String::from_utf8_lossy(&text);
        let first = first.lines().next().unwrap_or_default().trim();
        if !first.starts_with("# citygate ") {
            continue;
        }
        listed += 1;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let shown = if first == EXPORT_TAG_LINE {
            PublicKeys::read(&path).map(|k| print_export(&name, &k))
        } else {
            inspect(&path).map(|info| print_key(&info))
        };
        if let Err(e) = shown {
            failed += 1;
            println!("  {name:<22} unusable: {e}");
        }
    }
    if listed == 0 {
        println!("  (none)");
    }
    if failed > 0 {
        return Err(CliError::Usage(format!(
            "{failed} key file(s) in {} are unusable (see above)",
            dir.display()
        )));
    }
    Ok(())
}

/// `citygate keys export --dir DIR --out FILE [--gateway ID]`
pub(super) fn export(dir: &Path, out: &Path, gateway: Option<&str>) -> Result<(), CliError> {
    let gateway = gateway
        .map(|g| GatewayId::new(g).map_err(|e| CliError::Usage(format!("--gateway {g}: {e}"))))
        .transpose()?;
    let keys = PublicKeys::from_dir(dir, gateway).map_err(key_error)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    let mut file = options.open(out).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
            "; move it away or name another --out"
        } else {
            ""
        };
        CliError::Usage(format!("{}: {e}{hint}", out.display()))
    })?;
    std::io::Write::write_all(&mut file, keys.encode().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| CliError::Runtime(format!("{}: {e}", out.display())))?;
    println!(
        "{}: the {} public keys{} (no secret key):",
        out.display(),
        keys.role,
        keys.gateway
            .as_ref()
            .map(|g| format!(" of gateway {g}"))
            .unwrap_or_default()
    );
    print_export(
        &out.file_name().unwrap_or_default().to_string_lossy(),
        &keys,
    );
    let there = match keys.role {
        Role::Hub => "on each gateway: citygate keys import --from FILE --dir <its key folder>",
        Role::Gateway => "at the hub: citygate keys import --from FILE --dir <its registry folder>",
    };
    println!("Hand it over, then {there}, and compare the fingerprints it prints with these.");
    Ok(())
}

/// `citygate keys import --from FILE --dir DIR [--force]`
pub(super) fn import(from: &Path, dir: &Path, force: bool) -> Result<(), CliError> {
    let keys = PublicKeys::read(from).map_err(key_error)?;
    let written = keys.install(dir, force).map_err(key_error)?;
    println!(
        "imported the {}'s public keys{} into {}:",
        keys.role,
        keys.gateway
            .as_ref()
            .map(|g| format!(" (gateway {g})"))
            .unwrap_or_default(),
        dir.display()
    );
    for info in &written {
        print_key(info);
    }
    println!(
        "Compare these fingerprints with `citygate keys show` on the {} before trusting them \
         (read them aloud over the phone, not through the channel the file came by).",
        keys.role
    );
    match (&keys.gateway, written.first()) {
        (Some(g), Some(info)) => {
            let path = std::path::absolute(&info.path).unwrap_or_else(|_| info.path.clone());
            println!(
                "Register it in hub.toml (and approve its policies):\n[[gateway]]\nid = \"{g}\"\n\
                 verifying_key = \"{}\"",
                path.display()
            );
        }
        _ => {
            println!("The gateway config's [keys] hub_public_key and hub_ack_key name these files.")
        }
    }
    Ok(())
}

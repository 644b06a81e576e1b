//! `citygate keys`: generating the key files of one role, handing public keys between boxes
//! with fingerprints, rotating the pseudonym key, and issuing a small TLS PKI with the
//! broker's config and access rules.
//!
//! Files: `mod.rs` (arguments, `gen`, `rotate-pseudonym`), `handover.rs` (`show`, `export`,
//! `import`), `tls.rs` (`tls`).

mod handover;
mod tls;

use std::path::{Path, PathBuf};

use super::CliError;
use crate::config::GatewayConfig;
use crate::seal::keys;
use crate::seal::roles::{self, Role};

pub use tls::TlsIssue;

/// `citygate keys …`
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Generate the keys of one role: `--role gateway` (signing key pair, pseudonym key) or
    /// `--role hub` (HPKE key pair, ack-signing key pair). One role per folder.
    Gen {
        /// gateway | hub
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        /// Directory to write the key files into (created with mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// Overwrite existing key files of the role.
        #[arg(long)]
        force: bool,
    },
    /// List every key file in DIR with its role, kind and fingerprint (SHA-256 of the public
    /// key), to compare with what another box imported.
    Show {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write the public half of the role whose keys DIR holds into one file to hand over:
    /// the hub's HPKE and ack-verifying keys, or a gateway's verifying key (with its id).
    Export {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The gateway's id (its `[gateway] id`), for a gateway's export.
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Put another box's public keys where this box's config expects them: the hub's into a
    /// gateway's key folder (hub.hpke.pub, hub.ack.pub), a gateway's into the hub's registry
    /// folder (ID.sign.pub). Prints the fingerprints to compare with `keys show` there.
    Import {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        dir: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Rotate the gateway's pseudonym key: a fresh key of the next epoch replaces the old one
    /// (which is destroyed). Records carry the epoch, so the hub can tell key periods apart.
    /// Restart the gateway afterwards.
    RotatePseudonym {
        /// The gateway config naming the key (`[keys] pseudonym_key`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Generate a small TLS PKI for a one-box or pilot deployment: a CA, a broker
    /// certificate, client certificates per role, and a ready mosquitto config with its access
    /// rules (mosquitto.conf, mosquitto-acl.conf).
    Tls(Box<TlsIssue>),
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("`{s}`: the roles are `gateway` and `hub`"))
}

/// Runs one `citygate keys` command.
pub fn keys(command: KeysCommand) -> Result<(), CliError> {
    match command {
        KeysCommand::Gen { role, dir, force } => keys_gen(role, &dir, force),
        KeysCommand::Show { dir } => handover::show(&dir),
        KeysCommand::Export { dir, out, gateway } => {
            handover::export(&dir, &out, gateway.as_deref())
        }
        KeysCommand::Import { from, dir, force } => handover::import(&from, &dir, force),
        KeysCommand::RotatePseudonym { config } => keys_rotate_pseudonym(&config),
        KeysCommand::Tls(issue) => tls::keys_tls(&issue),
    }
}

fn key_error(e: keys::KeyError) -> CliError {
    CliError::Usage(e.to_string())
}

/// `citygate keys gen --role gateway|hub --dir DIR [--force]`
fn keys_gen(role: Option<Role>, dir: &Path, force: bool) -> Result<(), CliError> {
    let Some(role) = role else {
        return Err(CliError::Usage(
            "keys gen needs --role gateway (on each gateway: signing key pair, pseudonym key) \
             or --role hub (on the hub: HPKE key pair, ack-signing key pair); one role per folder"
                .into(),
        ));
    };
    let written = roles::generate_role(dir, role, force).map_err(key_error)?;
    println!("{role} keys in {}:", dir.display());
    for info in &written.files {
        handover::print_key(info);
    }
    match role {
        Role::Hub => println!(
            "Next: citygate keys export --dir {} --out hub.pub; copy hub.pub to each gateway and \
             run `citygate keys import --from hub.pub --dir <its key folder>` there",
            dir.display()
        ),
        Role::Gateway => println!(
            "Next: citygate keys import --from hub.pub --dir {dir} (the hub's export), and \
             citygate keys export --dir {dir} --gateway <id> --out <id>.pub for the hub's registry",
            dir = dir.display()
        ),
    }
    Ok(())
}

/// `citygate keys rotate-pseudonym --config FILE`: the key named by the config moves to its next
/// epoch. Prints key ids and epochs, never keys.
fn keys_rotate_pseudonym(config: &Path) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(config)?;
    let r = keys::rotate_pseudonym_key(&cfg.keys.pseudonym_key).map_err(key_error)?;
    tracing::info!(
        key = %cfg.keys.pseudonym_key.display(),
        old_epoch = r.old_epoch,
        old_key_id = %hex::encode(r.old_key_id),
        new_epoch = r.new_epoch,
        new_key_id = %hex::encode(r.new_key_id),
        "pseudonym key rotated"
    );
    println!(
        "pseudonym key {}: epoch {} (key id {}) → epoch {} (key id {}); the old key is destroyed. \
         Restart the gateway to use it.",
        cfg.keys.pseudonym_key.display(),
        r.old_epoch,
        hex::encode(r.old_key_id),
        r.new_epoch,
        hex::encode(r.new_key_id)
    );
    Ok(())
}

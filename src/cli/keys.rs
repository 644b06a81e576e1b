//! `citygate keys`: generating key files, rotating the pseudonym key, and issuing a small
//! TLS PKI with the broker's access rules.

use std::path::Path;

use super::CliError;
use crate::config::GatewayConfig;
use crate::seal::keys;

/// `citygate keys gen --dir DIR`
pub fn keys_gen(dir: &Path, force: bool) -> Result<(), CliError> {
    let g = keys::generate(dir, force).map_err(|e| CliError::Usage(e.to_string()))?;
    println!(
        "gateway signing key   {} (secret, 0600)",
        g.signing_key.display()
    );
    println!(
        "gateway verifying key {} (register it at the hub; key id {})",
        g.verifying_key.display(),
        hex::encode(g.signer_key_id)
    );
    println!(
        "hub HPKE secret key   {} (secret, 0600: belongs on the hub, not the gateway)",
        g.hub_secret_key.display()
    );
    println!(
        "hub HPKE public key   {} (key id {})",
        g.hub_public_key.display(),
        hex::encode(g.hub_key_id)
    );
    println!(
        "pseudonym key         {} (secret, 0600; key id {})",
        g.pseudonym_key.display(),
        hex::encode(g.pseudonym_key_id)
    );
    println!(
        "hub ack-signing key   {} (secret, 0600: belongs on the hub, not the gateway)",
        g.hub_ack_signing_key.display()
    );
    println!(
        "hub ack-verifying key {} (every gateway: only acks it verifies delete batches; key id {})",
        g.hub_ack_verifying_key.display(),
        hex::encode(g.hub_ack_key_id)
    );
    Ok(())
}

/// `citygate keys rotate-pseudonym --config FILE`: the key named by the config moves to its next
/// epoch. Prints key ids and epochs, never keys.
pub fn keys_rotate_pseudonym(config: &Path) -> Result<(), CliError> {
    let cfg = GatewayConfig::load(config)?;
    let r = keys::rotate_pseudonym_key(&cfg.keys.pseudonym_key)
        .map_err(|e| CliError::Usage(e.to_string()))?;
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

/// What `citygate keys tls` issues.
#[derive(Debug, Clone, Default)]
pub struct TlsIssue {
    pub dir: std::path::PathBuf,
    /// DNS names or IP addresses of the broker.
    pub servers: Vec<String>,
    pub gateways: Vec<String>,
    pub hubs: Vec<String>,
    /// Meters, simulators and other clients.
    pub clients: Vec<String>,
    /// Topic filters gateways may read (MQTT meters on this broker).
    pub meter_topics: Vec<String>,
    /// Listener port in the mosquitto.conf snippet.
    pub port: u16,
    pub force: bool,
}

/// `citygate keys tls --dir DIR --server NAME… [--gateway ID…] [--hub NAME…] [--client ID…]`:
/// the CA, broker and client certificates, and mosquitto's access rules for them.
pub fn keys_tls(issue: &TlsIssue) -> Result<(), CliError> {
    use crate::mqtt::acl::{self, BrokerRoles};
    use crate::mqtt::CertAuthority;
    let dir = issue.dir.as_path();
    if dir.join("ca.pem").exists() && !issue.force {
        return Err(CliError::Usage(format!(
            "{} already exists; certificates issued by it would stop verifying. Use --force to replace it",
            dir.join("ca.pem").display()
        )));
    }
    if issue.gateways.is_empty() && issue.hubs.is_empty() && issue.clients.is_empty() {
        return Err(CliError::Usage(
            "name at least one --gateway, --hub or --client to issue a certificate for".into(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for name in issue
        .gateways
        .iter()
        .chain(&issue.hubs)
        .chain(&issue.clients)
    {
        if !seen.insert(name) {
            return Err(CliError::Usage(format!(
                "{name} is named twice; one certificate (one CN, one broker identity) per name"
            )));
        }
    }
    let mut gateways = Vec::new();
    for g in &issue.gateways {
        gateways.push(
            crate::reading::GatewayId::new(g.as_str())
                .map_err(|e| CliError::Usage(format!("--gateway {g}: {e}")))?,
        );
    }
    for t in &issue.meter_topics {
        acl::check_meter_topic(t).map_err(CliError::Usage)?;
    }
    let (mut names, mut ips) = (Vec::new(), Vec::new());
    for s in &issue.servers {
        match s.parse::<std::net::IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(s.as_str()),
        }
    }
    let usage = |e: crate::mqtt::TlsError| CliError::Usage(e.to_string());
    let ca = CertAuthority::generate(dir, "citygate CA").map_err(usage)?;
    let server = ca.issue_server("broker", &names, &ips).map_err(usage)?;
    println!(
        "CA certificate        {} (give to every gateway, hub and the broker)",
        ca.ca_file().display()
    );
    println!(
        "broker certificate    {} + {} (0600) for {}",
        server.cert.display(),
        server.key.display(),
        issue.servers.join(", ")
    );
    let roles = [
        ("gateway", &issue.gateways),
        ("hub", &issue.hubs),
        ("client", &issue.clients),
    ];
    for (role, names) in roles {
        for c in names {
            let files = ca.issue_client(c).map_err(usage)?;
            println!(
                "{role:<8}certificate {} + {} (0600) for {c}",
                files.cert.display(),
                files.key.display()
            );
        }
    }
    let roles = BrokerRoles {
        gateways,
        hubs: issue.hubs.clone(),
        clients: issue.clients.clone(),
        meter_topics: issue.meter_topics.clone(),
    };
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?;
        Ok::<_, CliError>(path)
    };
    let acl_path = write("mosquitto-acl.conf", acl::mosquitto_acl(&roles))?;
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let conf_path = write("mosquitto.conf", acl::mosquitto_conf(&abs, issue.port))?;
    println!(
        "mosquitto            {} (access rules per certificate) and {} (listener)",
        acl_path.display(),
        conf_path.display()
    );
    println!(
        "The CA's private key was not written: issue further certificates by running this again \
         (a new CA) or with your own PKI."
    );
    Ok(())
}

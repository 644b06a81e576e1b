//! `citygate check --config hub.toml`: validates a hub config (every error located by
//! file:line, exit 64) and shows what the hub will do: its sink, state, broker, endpoint,
//! key files and the registry of gateways with the policies approved for each.
//!
//! Which kind of config a file is: a top-level `[hub]` table makes it a hub config;
//! anything else (a gateway config, or text that does not parse) is checked as a gateway
//! config, whose parser reports the problem with its location.

use std::fmt::Write as _;
use std::path::Path;

use super::check::{key_status, KeyStatus};
use crate::hub::config::SinkConfig;
use crate::hub::HubConfig;
use crate::seal::keys;

/// Whether `path` holds a hub config (a top-level `[hub]` table). Unreadable or
/// unparsable files are not: the gateway parser reports them.
pub(crate) fn is_hub_config(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|t| t.get("hub").is_some_and(toml::Value::is_table))
}

/// The report, and whether any key file is present but unusable (an error).
pub(crate) fn report(cfg: &HubConfig) -> (String, bool) {
    let mut out = String::new();
    let mut key_error = false;
    let _ = writeln!(out, "config    {} (hub)", cfg.path.display());
    let _ = writeln!(out, "hub       {}", cfg.id);
    match &cfg.sink {
        SinkConfig::Jsonl {
            path,
            rotate,
            state_path,
        } => {
            let mut when = Vec::new();
            if let Some(b) = rotate.bytes {
                when.push(format!("at {b} bytes"));
            }
            if let Some(e) = rotate.every {
                when.push(format!("every {}", humantime::format_duration(e)));
            }
            let rotation = if when.is_empty() {
                "not rotated by the hub".to_string()
            } else {
                format!("rotated {}", when.join(" or "))
            };
            let _ = writeln!(out, "sink      jsonl {} ({rotation})", path.display());
            let _ = writeln!(out, "state     {}", state_path.display());
        }
        SinkConfig::Postgres(pg) => {
            let tls = match &pg.tls {
                crate::hub::config::PgTls::VerifyFull { ca_file } => {
                    format!("TLS verified against {}", ca_file.display())
                }
                crate::hub::config::PgTls::Plaintext { danger: true } => {
                    "WITHOUT TLS (danger_plaintext)".to_owned()
                }
                crate::hub::config::PgTls::Plaintext { danger: false } => {
                    "without TLS (loopback)".to_owned()
                }
            };
            let _ = writeln!(
                out,
                "sink      postgres {} ({tls}), {} connection(s), up to {} batches in flight{}",
                pg.url,
                pg.connections,
                pg.max_in_flight,
                if pg.migrate {
                    ", migrates at start"
                } else {
                    ""
                }
            );
        }
    }
    let tls = if cfg.mqtt.danger_plaintext {
        "WITHOUT TLS (danger_plaintext)"
    } else {
        "mutual TLS"
    };
    let _ = writeln!(
        out,
        "broker    {} ({tls}), client id {}, group {}",
        cfg.mqtt.broker, cfg.mqtt.client_id, cfg.mqtt.share_group
    );
    if let Some(b) = &cfg.mqtt.embedded_broker {
        let _ = writeln!(out, "embedded  broker listening on {}", b.listen);
    }
    match cfg.status.listen {
        Some(addr) => {
            let _ = writeln!(out, "status    {addr}");
        }
        None => {
            let _ = writeln!(out, "status    off");
        }
    }
    let format = match cfg.log.format {
        crate::config::log::LogFormat::Text => "text",
        crate::config::log::LogFormat::Json => "json",
    };
    let _ = writeln!(out, "log       {format}");
    let key =
        |out: &mut String, key_error: &mut bool, name: &str, path: &Path, status: KeyStatus| {
            let s = match status {
                KeyStatus::Ok => "ok".to_string(),
                KeyStatus::Missing => "missing (`citygate hub` needs it)".to_string(),
                KeyStatus::Invalid(e) => {
                    *key_error = true;
                    format!("ERROR: {e}")
                }
            };
            let _ = writeln!(out, "key       {name} {}: {s}", path.display());
        };
    key(
        &mut out,
        &mut key_error,
        "hpke_secret_key",
        &cfg.hpke_secret_key,
        key_status(&cfg.hpke_secret_key, |p| {
            keys::load_hub_secret_key(p).map(|_| ())
        }),
    );
    key(
        &mut out,
        &mut key_error,
        "ack_signing_key",
        &cfg.ack_signing_key,
        key_status(&cfg.ack_signing_key, |p| {
            keys::load_hub_ack_signing_key(p).map(|_| ())
        }),
    );
    for g in &cfg.gateways {
        key(
            &mut out,
            &mut key_error,
            &format!("gateway {} verifying_key", g.id),
            &g.verifying_key,
            key_status(&g.verifying_key, |p| {
                keys::load_verifying_key(p).map(|_| ())
            }),
        );
        if g.policies.is_empty() {
            let _ = writeln!(
                out,
                "gateway   {}: no policy approved (only its own alarms are accepted)",
                g.id
            );
        }
        for p in &g.policies {
            let retention = p.retention.map_or_else(
                || "kept".to_string(),
                |r| format!("retention {}", humantime::format_duration(r)),
            );
            let _ = writeln!(
                out,
                "gateway   {}: approves {} {} ({retention})",
                g.id,
                p.stamp.purpose,
                p.stamp.hash_hex()
            );
        }
    }
    (out, key_error)
}

//! The hub's configuration file, parsed once into validated types, and its keys.
//!
//! ```toml
//! [hub]
//! id = "city-hub-1"
//! hpke_secret_key = "keys/hub.hpke.key"
//! ack_signing_key = "keys/hub.ack.key"   # signs every ack; gateways hold hub.ack.pub
//! state_path = "state"            # sled directory of the jsonl sink's de-dup window
//! [sink]                          # see `sink.rs` for the postgres sink
//! type = "jsonl"
//! path = "records.jsonl"
//! [mqtt]
//! broker = "broker.example:8883"
//! ca_file = "tls/ca.pem"
//! cert_file = "tls/hub.pem"
//! key_file = "tls/hub.key"
//! [[gateway]]
//! id = "gw-1"
//! verifying_key = "gateways/gw-1.sign.pub"
//! policies = [                    # what gw-1 may send: nothing unless listed
//!   { purpose = "billing", hash = "<64 hex digits>", retention = "400d" },
//! ]
//! ```
//!
//! Like the gateway config (`crate::config`): serde structs with `deny_unknown_fields`, spans
//! kept where semantic errors can occur, every error found returned as a located
//! [`Diagnostic`] (`FILE:LINE:COL: key ...: message`), relative paths resolved against the
//! config file's directory. The `[mqtt]` keys are validated here and used by the MQTT layer.
//!
//! Loading the config does not read any key file: [`HubKeys::load`] does, as a separate step,
//! so `citygate check` can validate a config on a machine without the keys.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;
use toml::Spanned;

use crate::config::{is_host_port, read_config_text, resolve_path, ConfigError};
use crate::diag::{Diagnostic, SourceFile};
use crate::reading::{GatewayId, PurposeName};
use crate::seal::{
    load_hub_secret_key, load_verifying_key, HubSecretKey, KeyError, Opener, PolicyStamp,
};
use crate::wire::AckSigner;

mod sink;

pub use sink::{PgConfig, PgTls, Rotation, SinkConfig};

/// The default MQTT shared-subscription group: hub processes in one group share the load.
pub(crate) const DEFAULT_SHARE_GROUP: &str = "citygate-hub";

/// A validated hub configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The hub's name (same characters as a gateway id); logged, and the default MQTT client id.
    pub id: String,
    pub hpke_secret_key: PathBuf,
    /// Ed25519 key that signs every ack (gateways verify with its public half).
    pub ack_signing_key: PathBuf,
    pub sink: SinkConfig,
    pub mqtt: MqttConfig,
    /// The registry: gateways whose batches are accepted, in file order, ids unique.
    pub gateways: Vec<GatewayEntry>,
    /// The local status endpoint (`/status`, `/metrics`, `/health`).
    pub status: crate::config::StatusConfig,
    /// How log lines are written (`[log]`).
    pub log: crate::config::log::LogConfig,
}

/// Where the hub's status endpoint listens unless the config says otherwise.
pub(crate) const DEFAULT_HUB_STATUS_LISTEN: &str = "127.0.0.1:9188";

/// How the hub reaches its broker. Used by the MQTT layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// `host:port`. With an embedded broker and no `broker` key: `localhost:{listen port}`,
    /// and [`MqttConfig::broker_is_embedded`] says to use the port actually bound.
    pub broker: String,
    /// True when `broker` was derived from `embedded_broker.listen`.
    pub broker_is_embedded: bool,
    pub client_id: String,
    /// Shared-subscription group (`$share/{group}/citygate/v1/+/+`).
    pub share_group: String,
    /// `None` only when `danger_plaintext` is set.
    pub tls: Option<TlsFiles>,
    /// Connect without TLS (development only).
    pub danger_plaintext: bool,
    /// Run a broker inside the hub process (one-box setups, the demo).
    pub embedded_broker: Option<EmbeddedBrokerConfig>,
    /// Reconnect delays (`reconnect_initial`, `reconnect_max`).
    pub reconnect: crate::backoff::BackoffPolicy,
}

pub(crate) use crate::config::TlsFiles;

/// A broker run inside the hub process (rumqttd), mutual TLS only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedBrokerConfig {
    /// Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The broker's certificate (leaf first) and key, and the CA client certificates of
    /// gateways and hubs must chain to.
    pub tls: crate::mqtt::TlsServerFiles,
}

/// One registered gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEntry {
    pub id: GatewayId,
    pub verifying_key: PathBuf,
    /// The policies its batches may be made under; none listed: none accepted (but the
    /// built-in gateway stamp on the audit stream).
    pub policies: Vec<ApprovedPolicy>,
}

/// A (purpose, policy hash) the hub accepts batches under, from one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovedPolicy {
    pub stamp: PolicyStamp,
    /// How long the hub keeps this purpose's records (`citygate hub prune`); `None`: no limit.
    pub retention: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHubConfig {
    hub: RawHub,
    sink: sink::RawSink,
    mqtt: RawMqtt,
    status: Option<crate::config::RawStatus>,
    log: Option<crate::config::log::RawLog>,
    #[serde(rename = "gateway", default)]
    gateways: Vec<RawGatewayEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    id: Spanned<String>,
    hpke_secret_key: PathBuf,
    ack_signing_key: PathBuf,
    state_path: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    broker: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    #[serde(default = "default_share_group")]
    share_group: Spanned<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    danger_plaintext: bool,
    embedded_broker: Option<RawEmbeddedBroker>,
    reconnect_initial: Option<Spanned<crate::config::duration::HumanDuration>>,
    reconnect_max: Option<Spanned<crate::config::duration::HumanDuration>>,
}

fn default_share_group() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_SHARE_GROUP.to_owned())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbeddedBroker {
    listen: Spanned<String>,
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGatewayEntry {
    id: Spanned<String>,
    verifying_key: PathBuf,
    #[serde(default)]
    policies: Vec<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    purpose: Spanned<String>,
    hash: Spanned<String>,
    retention: Option<Spanned<crate::config::duration::HumanDuration>>,
}

/// Validates one gateway's `policies`; errors name `gateway[i].policies[j].KEY`.
fn approved_policies(
    i: usize,
    raw: Vec<RawPolicy>,
    src: &SourceFile<'_>,
    errors: &mut Vec<Diagnostic>,
) -> Vec<ApprovedPolicy> {
    let mut out: Vec<ApprovedPolicy> = Vec::with_capacity(raw.len());
    for (j, p) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("gateway[{i}].policies[{j}].{k}");
        let purpose = PurposeName::new(p.purpose.get_ref().clone())
            .map_err(|e| errors.push(src.at(p.purpose.span(), key("purpose"), e.to_string())));
        let hash = parse_policy_hash(p.hash.get_ref())
            .map_err(|e| errors.push(src.at(p.hash.span(), key("hash"), e)));
        let retention = match p.retention {
            Some(r) if r.get_ref().0.is_zero() => {
                errors.push(src.at(
                    r.span(),
                    key("retention"),
                    "must be longer than 0, e.g. \"400d\"; leave it out to keep records",
                ));
                None
            }
            r => r.map(|r| r.get_ref().0),
        };
        if let (Ok(purpose), Ok(hash)) = (purpose, hash) {
            let stamp = PolicyStamp::new(purpose, hash);
            if out.iter().any(|a| a.stamp == stamp) {
                errors.push(src.at(
                    p.hash.span(),
                    key("hash"),
                    format!("policy `{stamp}` is approved twice"),
                ));
            } else if stamp.is_gateway() {
                errors.push(src.at(
                    p.purpose.span(),
                    key("purpose"),
                    "the built-in gateway stamp is accepted on the audit stream without approval",
                ));
            } else {
                out.push(ApprovedPolicy { stamp, retention });
            }
        }
    }
    out
}

/// A policy hash as the gateway's `citygate check` prints it: 64 hex digits.
fn parse_policy_hash(text: &str) -> Result<[u8; 32], String> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(text, &mut hash)
        .map_err(|_| format!("{text:?} is not a policy hash; valid: 64 hex digits, as `citygate check` prints after `policy`"))?;
    Ok(hash)
}

/// MQTT topic-level characters a share group or client id may not contain.
fn is_topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_graphic() && !"/+#$".contains(c))
}

impl HubConfig {
    /// Reads, parses and validates a hub config file.
    pub fn load(path: &Path) -> Result<HubConfig, ConfigError> {
        let text = read_config_text(path)?;
        HubConfig::parse(path, &text)
    }

    /// Parses config text as if read from `path` (relative paths resolve against its directory).
    pub(crate) fn parse(path: &Path, text: &str) -> Result<HubConfig, ConfigError> {
        let src = SourceFile::new(path, text);
        let raw: RawHubConfig = src.parse().map_err(|d| ConfigError::from(vec![d]))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| resolve_path(&base, p);
        let mut errors: Vec<Diagnostic> = Vec::new();

        let id = raw.hub.id.get_ref().clone();
        if let Err(e) = GatewayId::new(id.clone()) {
            let msg = e.to_string().replace("gateway id", "hub id");
            errors.push(src.at(raw.hub.id.span(), "hub.id", msg));
        }

        let m = raw.mqtt;
        if let Some(b) = &m.broker {
            if !is_host_port(b.get_ref()) {
                errors.push(src.at(
                    b.span(),
                    "mqtt.broker",
                    format!(
                        "{:?} is not host:port, e.g. \"broker.example:8883\"",
                        b.get_ref()
                    ),
                ));
            }
        }
        let client_id = match &m.client_id {
            Some(c) => {
                if !is_topic_safe(c.get_ref()) {
                    errors.push(src.at(
                        c.span(),
                        "mqtt.client_id",
                        "must be 1..=64 printable ASCII characters without '/', '+', '#', '$'",
                    ));
                }
                c.get_ref().clone()
            }
            None => id.clone(),
        };
        if !is_topic_safe(m.share_group.get_ref()) {
            errors.push(src.at(
                m.share_group.span(),
                "mqtt.share_group",
                "must be 1..=64 printable ASCII characters without '/', '+', '#', '$'",
            ));
        }
        let danger_plaintext = m.danger_plaintext;
        let reconnect = crate::config::reconnect_policy(
            "mqtt",
            m.reconnect_initial,
            m.reconnect_max,
            &src,
            &mut errors,
        );
        let tls = crate::config::tls_files(
            m.ca_file,
            m.cert_file,
            m.key_file,
            danger_plaintext,
            &resolve,
        )
        .unwrap_or_else(|msg| {
            errors.push(match &m.broker {
                Some(b) => src.at(b.span(), "mqtt", msg),
                None => src.whole("mqtt", msg),
            });
            None
        });
        let embedded_broker = m.embedded_broker.and_then(|b| {
            b.listen
                .get_ref()
                .parse::<SocketAddr>()
                .map(|listen| EmbeddedBrokerConfig {
                    listen,
                    tls: crate::mqtt::TlsServerFiles {
                        client_ca: resolve(&b.client_ca_file),
                        cert: resolve(&b.cert_file),
                        key: resolve(&b.key_file),
                    },
                })
                .map_err(|_| {
                    errors.push(src.at(
                        b.listen.span(),
                        "mqtt.embedded_broker.listen",
                        format!(
                            "{:?} is not ip:port, e.g. \"127.0.0.1:8883\"",
                            b.listen.get_ref()
                        ),
                    ))
                })
                .ok()
        });
        let (broker, broker_is_embedded) = match (m.broker, &embedded_broker) {
            (Some(b), _) => (b.into_inner(), false),
            (None, Some(e)) => (format!("localhost:{}", e.listen.port()), true),
            (None, None) => {
                errors.push(src.whole(
                    "mqtt.broker",
                    "missing: give the broker's host:port, or run one in the hub with \
                     embedded_broker = { listen, cert_file, key_file, client_ca_file }",
                ));
                (String::new(), false)
            }
        };

        let mut seen = HashSet::new();
        let mut gateways = Vec::with_capacity(raw.gateways.len());
        for (i, g) in raw.gateways.into_iter().enumerate() {
            let key = format!("gateway[{i}].id");
            match GatewayId::new(g.id.get_ref().clone()) {
                Ok(id) if !seen.insert(id.clone()) => errors.push(src.at(
                    g.id.span(),
                    key,
                    format!("gateway `{id}` is registered twice; each id may appear once"),
                )),
                Ok(id) => gateways.push(GatewayEntry {
                    id,
                    verifying_key: resolve(&g.verifying_key),
                    policies: approved_policies(i, g.policies, &src, &mut errors),
                }),
                Err(e) => errors.push(src.at(g.id.span(), key, e.to_string())),
            }
        }
        if gateways.is_empty() && errors.is_empty() {
            errors.push(src.whole(
                "gateway",
                "no [[gateway]] is registered; a hub without gateways rejects every batch",
            ));
        }

        let status =
            crate::config::status_config(raw.status, &src, &mut errors, DEFAULT_HUB_STATUS_LISTEN);
        let log = crate::config::log::log_config(raw.log, &src, &mut errors);

        let sink = sink::sink_config(raw.sink, raw.hub.state_path, &src, &resolve, &mut errors);
        if !errors.is_empty() {
            return Err(errors.into());
        }
        Ok(HubConfig {
            path: path.to_path_buf(),
            id,
            hpke_secret_key: resolve(&raw.hub.hpke_secret_key),
            ack_signing_key: resolve(&raw.hub.ack_signing_key),
            sink: sink.expect("invariant: a sink without errors"),
            mqtt: MqttConfig {
                broker,
                broker_is_embedded,
                client_id,
                share_group: m.share_group.into_inner(),
                tls,
                danger_plaintext,
                embedded_broker,
                reconnect,
            },
            gateways,
            status,
            log,
        })
    }
}

/// The keys a hub needs: its HPKE secret key, its ack-signing key and each registered
/// gateway's verifying key.
pub struct HubKeys {
    pub hub_secret: HubSecretKey,
    pub ack_signing: ed25519_dalek::SigningKey,
    pub gateways: Vec<(GatewayId, VerifyingKey)>,
}

impl HubKeys {
    /// Loads every key file the config names; the first failure names its file.
    pub(crate) fn load(cfg: &HubConfig) -> Result<HubKeys, KeyError> {
        let hub_secret = load_hub_secret_key(&cfg.hpke_secret_key)?;
        let ack_signing = crate::seal::load_hub_ack_signing_key(&cfg.ack_signing_key)?;
        let gateways = cfg
            .gateways
            .iter()
            .map(|g| Ok((g.id.clone(), load_verifying_key(&g.verifying_key)?)))
            .collect::<Result<_, KeyError>>()?;
        Ok(HubKeys {
            hub_secret,
            ack_signing,
            gateways,
        })
    }

    /// An [`Opener`] for the hub key with every gateway registered, and the ack signer.
    pub(crate) fn into_parts(self) -> (Opener, AckSigner) {
        let mut opener = Opener::new(self.hub_secret);
        for (id, key) in self.gateways {
            opener.register(id, key);
        }
        (opener, AckSigner::new(self.ack_signing))
    }
}

impl std::fmt::Debug for HubKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.gateways.iter().map(|(g, _)| g.as_str()).collect();
        f.debug_struct("HubKeys")
            .field("hub_key_id", &hex::encode(self.hub_secret.key_id()))
            .field(
                "ack_key_id",
                &hex::encode(crate::seal::key_id(
                    self.ack_signing.verifying_key().as_bytes(),
                )),
            )
            .field("gateways", &ids)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"[hub]
id = "hub-1"
hpke_secret_key = "keys/hub.hpke.key"
ack_signing_key = "keys/hub.ack.key"
state_path = "state"

[sink]
type = "jsonl"
path = "out/records.jsonl"

[mqtt]
broker = "127.0.0.1:8883"
ca_file = "tls/ca.pem"
cert_file = "tls/hub.pem"
key_file = "tls/hub.key"

[[gateway]]
id = "gw-1"
verifying_key = "gw/gw-1.pub"

[[gateway]]
id = "gw-2"
verifying_key = "/abs/gw-2.pub"
"#;

    fn parse(text: &str) -> Result<HubConfig, ConfigError> {
        HubConfig::parse(Path::new("/etc/citygate/hub.toml"), text)
    }

    fn errors(text: &str) -> Vec<Diagnostic> {
        parse(text).unwrap_err().diagnostics
    }

    #[test]
    fn loads_with_defaults_and_resolved_paths() {
        let c = parse(CONFIG).unwrap();
        assert_eq!(c.id, "hub-1");
        assert_eq!(
            c.sink,
            SinkConfig::Jsonl {
                path: "/etc/citygate/out/records.jsonl".into(),
                rotate: Rotation::default(),
                state_path: "/etc/citygate/state".into(),
            }
        );
        assert_eq!(c.mqtt.client_id, "hub-1");
        assert_eq!(c.mqtt.share_group, DEFAULT_SHARE_GROUP);
        assert!(!c.mqtt.danger_plaintext);
        assert_eq!(
            c.mqtt.tls.as_ref().unwrap().ca_file,
            Path::new("/etc/citygate/tls/ca.pem")
        );
        assert_eq!(c.gateways.len(), 2);
        assert_eq!(
            c.gateways[0].verifying_key,
            Path::new("/etc/citygate/gw/gw-1.pub")
        );
        assert_eq!(c.gateways[1].verifying_key, Path::new("/abs/gw-2.pub"));
        assert_eq!(c.mqtt.embedded_broker, None);
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let e = errors(&CONFIG.replace("state_path", "stat_path"));
        assert_eq!(
            (e[0].line, e[0].key.as_str()),
            (5, "hub.stat_path"),
            "{}",
            e[0]
        );
        assert!(e[0].to_string().starts_with("/etc/citygate/hub.toml:5:"));
    }

    #[test]
    fn duplicate_gateway_is_an_error_at_its_line() {
        let e = errors(&CONFIG.replace("id = \"gw-2\"", "id = \"gw-1\""));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].key.as_str()), (22, "gateway[1].id"));
        assert!(e[0].message.contains("twice"));
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = CONFIG
            .replace("127.0.0.1:8883", "localhost")
            .replace("id = \"hub-1\"", "id = \"hub 1\"")
            .replace("id = \"gw-2\"", "id = \"gw/2\"")
            .replace("[mqtt]\n", "[mqtt]\nshare_group = \"a/b\"\n")
            .replace(
                "key_file = \"tls/hub.key\"",
                "embedded_broker = { listen = \"nowhere\", cert_file = \"b.pem\", key_file = \"b.key\", client_ca_file = \"ca.pem\" }",
            );
        let keys: Vec<String> = errors(&text).into_iter().map(|d| d.key).collect();
        for k in [
            "hub.id",
            "mqtt.broker",
            "mqtt.share_group",
            "mqtt",
            "mqtt.embedded_broker.listen",
            "gateway[1].id",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing in {keys:?}");
        }
    }

    #[test]
    fn plaintext_only_when_asked_and_embedded_broker_parses() {
        let no_tls = CONFIG
            .replace("ca_file = \"tls/ca.pem\"\n", "")
            .replace("cert_file = \"tls/hub.pem\"\n", "")
            .replace("key_file = \"tls/hub.key\"\n", "");
        let e = errors(&no_tls);
        assert!(e[0].message.contains("danger_plaintext"), "{}", e[0]);
        let c = parse(&no_tls.replace("[mqtt]\n", "[mqtt]\ndanger_plaintext = true\n")).unwrap();
        assert!(c.mqtt.danger_plaintext && c.mqtt.tls.is_none());
    }

    #[test]
    fn embedded_broker_needs_its_tls_files_and_can_stand_in_for_broker() {
        let embedded =
            "embedded_broker = { listen = \"127.0.0.1:0\", cert_file = \"tls/broker.pem\", \
                        key_file = \"tls/broker.key\", client_ca_file = \"tls/ca.pem\" }\n";
        let c = parse(&CONFIG.replace("broker = \"127.0.0.1:8883\"\n", embedded)).unwrap();
        let e = c.mqtt.embedded_broker.unwrap();
        assert_eq!(e.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(e.tls.cert, Path::new("/etc/citygate/tls/broker.pem"));
        assert_eq!(e.tls.client_ca, Path::new("/etc/citygate/tls/ca.pem"));
        assert!(c.mqtt.broker_is_embedded);
        assert_eq!(c.mqtt.broker, "localhost:0");
        // Without its certificate it is an error naming the missing key.
        let e = errors(&CONFIG.replace(
            "broker = \"127.0.0.1:8883\"\n",
            "embedded_broker = { listen = \"127.0.0.1:0\" }\n",
        ));
        assert!(e[0].to_string().contains("cert_file"), "{}", e[0]);
        // Neither a broker nor an embedded one.
        let e = errors(&CONFIG.replace("broker = \"127.0.0.1:8883\"\n", ""));
        assert_eq!(e[0].key, "mqtt.broker");
    }

    /// issue 10 item 2: the reconnect keys default to the low jittered cap and are
    /// validated with file, line and key.
    #[test]
    fn reconnect_keys_default_low_and_are_validated() {
        let c = parse(CONFIG).unwrap();
        assert_eq!(c.mqtt.reconnect, crate::backoff::BackoffPolicy::RECONNECT);
        let c = parse(&CONFIG.replace(
            "[mqtt]\n",
            "[mqtt]\nreconnect_initial = \"50ms\"\nreconnect_max = \"5s\"\n",
        ))
        .unwrap();
        assert_eq!(
            c.mqtt.reconnect.initial,
            std::time::Duration::from_millis(50)
        );
        assert_eq!(c.mqtt.reconnect.max, std::time::Duration::from_secs(5));
        let e = errors(&CONFIG.replace(
            "[mqtt]\n",
            "[mqtt]\nreconnect_initial = \"1ms\"\nreconnect_max = \"1h\"\n",
        ));
        let found: Vec<(usize, &str)> = e.iter().map(|d| (d.line, d.key.as_str())).collect();
        assert_eq!(
            found,
            [(12, "mqtt.reconnect_initial"), (13, "mqtt.reconnect_max")],
            "{e:?}"
        );
        let e = errors(&CONFIG.replace(
            "[mqtt]\n",
            "[mqtt]\nreconnect_initial = \"3s\"\nreconnect_max = \"1s\"\n",
        ));
        assert!(e[0].message.contains("reconnect_initial"), "{}", e[0]);
    }

    /// Issue 11 item 3: each gateway lists its approved (purpose, hash, retention); none listed
    /// approves nothing; mistakes name file, line and key.
    #[test]
    fn approved_policies_parse_and_errors_name_line_and_key() {
        let hash = "ab".repeat(32);
        let c = parse(&CONFIG.replace(
            "verifying_key = \"gw/gw-1.pub\"\n",
            &format!(
                "verifying_key = \"gw/gw-1.pub\"\npolicies = [\n  {{ purpose = \"billing\", hash = \"{hash}\", retention = \"400d\" }},\n  {{ purpose = \"open-data\", hash = \"{hash}\" }},\n]\n"
            ),
        ))
        .unwrap();
        let p = &c.gateways[0].policies;
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].stamp.purpose.as_str(), "billing");
        assert_eq!(p[0].stamp.hash, [0xab; 32]);
        assert_eq!(p[0].retention, Some(Duration::from_secs(400 * 86_400)));
        assert_eq!(p[1].retention, None);
        assert!(c.gateways[1].policies.is_empty());

        let e = errors(&CONFIG.replace(
            "verifying_key = \"gw/gw-1.pub\"\n",
            "verifying_key = \"gw/gw-1.pub\"\npolicies = [\n  { purpose = \"bill ing\", hash = \"abc\" },\n  { purpose = \"x\", hash = \"00\", color = 1 },\n]\n",
        ));
        assert!(
            e[0].to_string().starts_with("/etc/citygate/hub.toml:"),
            "{}",
            e[0]
        );
        let e = errors(&CONFIG.replace(
            "verifying_key = \"gw/gw-1.pub\"\n",
            &format!("verifying_key = \"gw/gw-1.pub\"\npolicies = [\n  {{ purpose = \"bill ing\", hash = \"abc\", retention = \"0s\" }},\n  {{ purpose = \"a\", hash = \"{hash}\" }},\n  {{ purpose = \"a\", hash = \"{hash}\" }},\n]\n"),
        ));
        let found: Vec<(usize, &str)> = e.iter().map(|d| (d.line, d.key.as_str())).collect();
        assert_eq!(
            found,
            [
                (21, "gateway[0].policies[0].purpose"),
                (21, "gateway[0].policies[0].hash"),
                (21, "gateway[0].policies[0].retention"),
                (23, "gateway[0].policies[2].hash"),
            ],
            "{e:?}"
        );
        assert!(e[1].message.contains("64 hex digits"), "{}", e[1]);
    }

    /// issue 12 item 4: rotation keys are read and validated with their line.
    #[test]
    fn sink_rotation_keys_are_validated() {
        let base = "[hub]\nid = \"h\"\nhpke_secret_key = \"k\"\nack_signing_key = \"a\"\nstate_path = \"s\"\n\
                    [mqtt]\nbroker = \"localhost:1\"\ndanger_plaintext = true\n\
                    [sink]\ntype = \"jsonl\"\npath = \"r.jsonl\"\n";
        let gw = "[[gateway]]\nid = \"gw-1\"\nverifying_key = \"v\"\n";
        let ok = HubConfig::parse(
            Path::new("/etc/h.toml"),
            &format!("{base}rotate_bytes = 1073741824\nrotate_every = \"1d\"\n{gw}"),
        )
        .unwrap();
        let SinkConfig::Jsonl { rotate, .. } = ok.sink else {
            panic!("not jsonl")
        };
        assert_eq!(rotate.bytes, Some(1 << 30));
        assert_eq!(rotate.every, Some(Duration::from_secs(86_400)));
        let e = HubConfig::parse(
            Path::new("/etc/h.toml"),
            &format!("{base}rotate_bytes = 10\nrotate_every = \"1s\"\n{gw}"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("h.toml:12:") && e.contains("sink.rotate_bytes"),
            "{e}"
        );
        assert!(
            e.contains("h.toml:13:") && e.contains("sink.rotate_every"),
            "{e}"
        );
    }

    #[test]
    fn unknown_sink_type_says_what_is_valid() {
        let e = errors(&CONFIG.replace("type = \"jsonl\"", "type = \"kafka\""));
        assert!(e[0].message.contains("jsonl"), "{}", e[0]);
    }

    #[test]
    fn keys_load_separately_and_name_the_missing_file() {
        let c = parse(CONFIG).unwrap();
        let err = HubKeys::load(&c).unwrap_err().to_string();
        assert!(err.contains("/etc/citygate/keys/hub.hpke.key"), "{err}");
    }
}

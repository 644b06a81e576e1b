//! The fleet load test's run directory: the hub's keys (`hub-keys/`, the gateways' copies
//! of its public halves in `keys/`), one Ed25519 key per simulated gateway (the public half
//! in `gateways/{id}.sign.pub`, registered in the hub config; the secret half stays in
//! memory), a CA with a server certificate for the broker and one client certificate per
//! MQTT connection and hub, the broker's config and ACL, and one config per hub.
//!
//! Every hub config is the same but for `[hub] id`, the state and sink paths and the status
//! port; all of them join the default share group. The `[sink]` section comes from
//! [`sink_toml`] alone.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use super::{BrokerKind, HubLoadArgs, SinkKind};
use crate::cli::loadtest::setup::free_port;
use crate::cli::CliError;
use crate::mqtt::CertAuthority;
use crate::reading::{GatewayId, PurposeName, Stream};
use crate::seal::PolicyStamp;
use crate::wire::{ack_topic, stream_topic};

/// The purpose every simulated gateway seals under (approved for each in the hub config).
const PURPOSE: &str = "loadtest-fleet";

fn rt(e: impl std::fmt::Display) -> CliError {
    CliError::Runtime(e.to_string())
}

/// Quotes a path for TOML.
fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// The name of simulated gateway `k` (1-based).
pub(super) fn gateway_name(k: u32) -> String {
    format!("gw-{k:05}")
}

/// The policy stamp the fleet seals under: purpose `loadtest-fleet`, hash SHA-256 of a
/// constant (the hub checks only that the pair is approved for the gateway).
pub(super) fn stamp() -> PolicyStamp {
    PolicyStamp::new(
        PurposeName::new(PURPOSE).expect("invariant: a valid purpose name"),
        Sha256::digest(b"citygate loadtest hub fleet policy").into(),
    )
}

/// A client's TLS files.
#[derive(Debug, Clone)]
pub(super) struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One simulated gateway's identity.
#[derive(Debug)]
pub(super) struct FleetGateway {
    pub id: GatewayId,
    pub signing: SigningKey,
}

/// One MQTT connection of the fleet and the gateways (indexes into `gateways`) it carries.
#[derive(Debug)]
pub(super) struct Connection {
    pub client_id: String,
    pub tls: ClientTls,
    pub gateways: std::ops::Range<usize>,
}

/// One hub process's files and ports.
#[derive(Debug, Clone)]
pub(super) struct HubFiles {
    pub id: String,
    pub config: PathBuf,
    pub status: SocketAddr,
    pub sink: PathBuf,
    sink_section: String,
    /// The jsonl sink's de-dup state (`[hub] state_path`); a database sink keeps none.
    state: Option<PathBuf>,
    tls: ClientTls,
}

/// Everything prepared before any process starts.
#[derive(Debug)]
pub(super) struct Setup {
    pub dir: PathBuf,
    pub broker: BrokerKind,
    /// The broker's loopback port (mosquitto: picked again if taken, see `run`).
    pub broker_port: u16,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub ca: PathBuf,
    pub gateways: Vec<FleetGateway>,
    pub connections: Vec<Connection>,
    pub hubs: Vec<HubFiles>,
    pub hub_public_key: PathBuf,
    pub hub_ack_key: PathBuf,
}

/// The `[sink]` section of hub `index`'s config (1-based), and the file or place it writes;
/// `pg` is the database's URL and each hub's connections.
pub(super) fn sink_toml(
    kind: SinkKind,
    dir: &Path,
    index: u8,
    pg: Option<(&str, u8)>,
) -> (String, PathBuf) {
    match kind {
        SinkKind::Jsonl => {
            let path = dir.join(format!("records-{index}.jsonl"));
            (
                format!("[sink]\ntype = \"jsonl\"\npath = {}\n", q(&path)),
                path,
            )
        }
        // One database for all hubs: there is no file to name.
        SinkKind::Postgres => (
            format!(
                "[sink]\ntype = \"postgres\"\nurl = {}\nconnections = {}\n",
                toml::Value::String(pg.map_or("", |p| p.0).to_owned()),
                pg.map_or(1, |p| p.1),
            ),
            PathBuf::new(),
        ),
    }
}

/// The mosquitto binary, if installed.
pub(super) fn mosquitto_binary() -> Option<&'static str> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

impl Setup {
    /// Writes keys, certificates and hub configs into `dir`.
    pub(super) fn prepare(args: &HubLoadArgs, dir: &Path) -> Result<Setup, CliError> {
        let broker = match args.broker {
            Some(b) => b,
            None if mosquitto_binary().is_some() => BrokerKind::Mosquitto,
            None => BrokerKind::Embedded,
        };
        if broker == BrokerKind::Mosquitto && mosquitto_binary().is_none() {
            return Err(CliError::Usage(
                "--broker mosquitto: mosquitto is not installed".into(),
            ));
        }
        crate::seal::handover::generate_one_box(&dir.join("hub-keys"), &dir.join("keys"))
            .map_err(rt)?;
        let gateways = fleet_keys(args, &dir.join("gateways"))?;
        let tls_dir = dir.join("tls");
        let ca = CertAuthority::generate(&tls_dir, "citygate loadtest hub CA").map_err(rt)?;
        let server = ca
            .issue_server("broker", &["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .map_err(rt)?;
        let client = |name: &str| {
            let f = ca.issue_client(name).map_err(rt)?;
            Ok::<_, CliError>(ClientTls {
                ca: ca.ca_file().to_owned(),
                cert: f.cert,
                key: f.key,
            })
        };
        // The embedded broker's access rules know gateways, not groups of them.
        let per = match broker {
            BrokerKind::Mosquitto => args.per_connection as usize,
            BrokerKind::Embedded => 1,
        };
        let mut connections = Vec::new();
        for (c, start) in (0..gateways.len()).step_by(per).enumerate() {
            let range = start..(start + per).min(gateways.len());
            let client_id = if per == 1 {
                gateways[start].id.to_string()
            } else {
                format!("fleet-c{:04}", c + 1)
            };
            connections.push(Connection {
                tls: client(&client_id)?,
                client_id,
                gateways: range,
            });
        }
        let mut hubs = Vec::new();
        for i in 1..=args.hubs {
            let id = format!("loadtest-hub-{i}");
            let tls = client(&id)?;
            let status = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let (sink, sink_path) = sink_toml(
                args.sink,
                dir,
                i,
                args.pg_url.as_deref().map(|u| (u, args.pg_connections)),
            );
            let config = dir.join(format!("hub-{i}.toml"));
            let state = (args.sink == SinkKind::Jsonl).then(|| dir.join(format!("{id}-state")));
            hubs.push(HubFiles {
                id,
                config,
                status,
                sink: sink_path,
                sink_section: sink,
                state,
                tls,
            });
        }
        let setup = Setup {
            dir: dir.to_owned(),
            broker,
            broker_port: free_port()?,
            server_cert: server.cert,
            server_key: server.key,
            ca: ca.ca_file().to_owned(),
            gateways,
            connections,
            hubs,
            hub_public_key: dir.join("keys/hub.hpke.pub"),
            hub_ack_key: dir.join("keys/hub.ack.pub"),
        };
        std::fs::write(dir.join("mosquitto-acl.conf"), setup.mosquitto_acl()).map_err(rt)?;
        Ok(setup)
    }

    /// Writes every hub's config for a broker on `port`.
    pub(super) fn write_hub_configs(&self, port: u16) -> Result<(), CliError> {
        for h in &self.hubs {
            std::fs::write(&h.config, hub_toml(h, port, &self.gateways, &self.dir)).map_err(rt)?;
        }
        Ok(())
    }

    /// The broker address as clients dial it.
    pub(super) fn broker_address(&self) -> String {
        format!("localhost:{}", self.broker_port)
    }

    /// mosquitto's access rules: each fleet connection may write the readings topic and
    /// read the ack topic of its own gateways only; hubs read every batch topic and write
    /// acks and presence (the rules `citygate keys tls` writes for hubs).
    fn mosquitto_acl(&self) -> String {
        let roles = crate::mqtt::acl::BrokerRoles {
            hubs: self.hubs.iter().map(|h| h.id.clone()).collect(),
            ..Default::default()
        };
        let mut out = crate::mqtt::acl::mosquitto_acl(&roles);
        for c in &self.connections {
            let _ = writeln!(
                out,
                "\n# fleet connection {}\nuser {}",
                c.client_id, c.client_id
            );
            for g in &self.gateways[c.gateways.clone()] {
                let _ = writeln!(out, "topic write {}", stream_topic(&g.id, Stream::Readings));
                let _ = writeln!(out, "topic read {}", ack_topic(&g.id));
            }
            let _ = writeln!(out, "topic read {}", crate::wire::presence_filter());
        }
        out
    }

    /// mosquitto's config for `port`: mutual TLS 1.3, certificate name as user and client
    /// id, the ACL, no persistence, loopback only.
    pub(super) fn mosquitto_conf(&self, port: u16) -> String {
        format!(
            "listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
             tls_version tlsv1.3\nrequire_certificate true\nuse_identity_as_username true\n\
             use_username_as_clientid true\nallow_anonymous false\nacl_file {acl}\n\
             max_packet_size 1100000\npersistence false\n\
             # Started as root, mosquitto would switch to user mosquitto, which cannot read\n\
             # the run directory.\nuser root\n",
            ca = self.ca.display(),
            cert = self.server_cert.display(),
            key = self.server_key.display(),
            acl = self.dir.join("mosquitto-acl.conf").display(),
        )
    }
}

/// One signing key per gateway (seeded: the same `--seed` gives the same fleet), the
/// public half written as `keys` writes a `gateway.sign.pub`.
fn fleet_keys(args: &HubLoadArgs, dir: &Path) -> Result<Vec<FleetGateway>, CliError> {
    std::fs::create_dir_all(dir).map_err(rt)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut out = Vec::new();
    for k in 1..=args.gateways {
        let id = GatewayId::new(gateway_name(k)).map_err(rt)?;
        let signing = SigningKey::generate(&mut rng);
        let text = format!(
            "# citygate gateway-verifying-key v1\n{}\n",
            hex::encode(signing.verifying_key().as_bytes())
        );
        std::fs::write(dir.join(format!("{id}.sign.pub")), text).map_err(rt)?;
        out.push(FleetGateway { id, signing });
    }
    // The hub refuses a malformed key file at start; check one here for a clearer error.
    if let Some(g) = out.first() {
        crate::seal::load_verifying_key(&dir.join(format!("{}.sign.pub", g.id))).map_err(rt)?;
    }
    Ok(out)
}

/// Hub `h`'s config: every fleet gateway registered with the fleet's approved policy.
fn hub_toml(h: &HubFiles, port: u16, gateways: &[FleetGateway], dir: &Path) -> String {
    let policies = crate::supervisor::approval_toml(&[(Stream::Readings, stamp())]);
    let state = h
        .state
        .as_ref()
        .map_or_else(String::new, |p| format!("state_path = {}\n", q(p)));
    let mut text = format!(
        "[hub]\nid = \"{id}\"\nhpke_secret_key = {hpke}\nack_signing_key = {ack}\n\
         {state}\n{sink}\n\
         [mqtt]\nbroker = \"localhost:{port}\"\nca_file = {ca}\ncert_file = {cert}\n\
         key_file = {key}\n\n[status]\nlisten = \"{status}\"\n",
        id = h.id,
        hpke = q(&dir.join("hub-keys/hub.hpke.key")),
        ack = q(&dir.join("hub-keys/hub.ack.key")),
        sink = h.sink_section,
        ca = q(&h.tls.ca),
        cert = q(&h.tls.cert),
        key = q(&h.tls.key),
        status = h.status,
    );
    for g in gateways {
        let _ = write!(
            text,
            "\n[[gateway]]\nid = \"{}\"\nverifying_key = {}\npolicies = {policies}\n",
            g.id,
            q(&dir.join(format!("gateways/{}.sign.pub", g.id))),
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hub_gets_its_own_jsonl_file_and_gateway_names_are_ids() {
        let dir = Path::new("/tmp/x");
        let (toml, path) = sink_toml(SinkKind::Jsonl, dir, 2, None);
        assert_eq!(path, dir.join("records-2.jsonl"));
        assert!(toml.contains("type = \"jsonl\""), "{toml}");
        let (toml, _) = sink_toml(
            SinkKind::Postgres,
            dir,
            2,
            Some(("postgresql://u@127.0.0.1:5/d", 3)),
        );
        let parsed: toml::Table = toml.parse().unwrap();
        assert_eq!(
            parsed["sink"]["url"].as_str(),
            Some("postgresql://u@127.0.0.1:5/d")
        );
        assert_eq!(parsed["sink"]["connections"].as_integer(), Some(3));
        assert_eq!(gateway_name(7), "gw-00007");
        assert!(GatewayId::new(gateway_name(99_999)).is_ok());
    }
}

//! The load test's run directory: the profile, keys as `keys gen --role` and `keys import`
//! write them (`hub-keys/`, `keys/`), a CA and
//! certificates as `keys tls` writes them, and the hub and gateway configs.
//!
//! Only config keys that `citygate run` and `citygate hub` have accepted since before the
//! load test existed are written, so an older binary (`--citygate-bin`) can be measured with
//! the same set-up. Batching, uplink and Modbus settings are left at their defaults: the
//! load test measures what an operator gets.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{LoadtestArgs, Transport};
use crate::cli::CliError;
use crate::mqtt::CertAuthority;
use crate::profile::Profile;
use crate::reading::{DeviceId, Stream};
use crate::seal::keys;

/// Gateway id (and its certificate's name) unless `--gateway-id` says otherwise.
pub(crate) const DEFAULT_GATEWAY_ID: &str = "loadtest-gw";
/// Hub id (and its certificate's name) unless `--hub-id` says otherwise.
pub(crate) const DEFAULT_HUB_ID: &str = "loadtest-hub";

/// A client's TLS files.
#[derive(Debug, Clone)]
pub(super) struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The broker the gateway and hub use.
#[derive(Debug, Clone)]
pub(super) enum BrokerPlan {
    /// `citygate broker` started by the load test on this loopback port.
    Own {
        port: u16,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    },
    /// An external broker, `host:port`.
    External { address: String },
}

/// Everything prepared before any process starts.
#[derive(Debug)]
pub(super) struct Setup {
    pub dir: PathBuf,
    pub profile: Arc<Profile>,
    pub broker: BrokerPlan,
    /// `None`: plaintext to an external broker.
    pub gateway_tls: Option<ClientTls>,
    pub hub_tls: Option<ClientTls>,
    pub gateway_id: String,
    pub hub_id: String,
    pub hub_status: SocketAddr,
    pub gateway_status: SocketAddr,
    /// Meters per simulator endpoint, in endpoint order.
    pub endpoints: Vec<u8>,
    pub hub_config: PathBuf,
    pub gateway_config: PathBuf,
}

/// The name of meter `k` (1-based): `m00001`, …
pub(super) fn device_name(k: u32) -> String {
    format!("m{k:05}")
}

/// How `meters` split over endpoints of at most `per_endpoint` unit ids each.
pub(super) fn split(meters: u32, per_endpoint: u8) -> Vec<u8> {
    let per = u32::from(per_endpoint.max(1));
    (0..meters.div_ceil(per))
        .map(|i| {
            u8::try_from((meters - i * per).min(per)).expect("invariant: at most per_endpoint")
        })
        .collect()
}

/// A loopback port free right now (bound and released; the OS does not hand it out again
/// at once).
pub(super) fn free_port() -> Result<u16, CliError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| CliError::Runtime(format!("cannot find a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| CliError::Runtime(e.to_string()))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

fn rt(e: impl std::fmt::Display) -> CliError {
    CliError::Runtime(e.to_string())
}

/// Quotes a path for TOML.
fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

impl Setup {
    /// Writes the profile, keys, certificates and the hub config into `dir`.
    pub(super) fn prepare(args: &LoadtestArgs, dir: &Path) -> Result<Setup, CliError> {
        let source = args.profiles_dir.join(format!("{}.toml", args.profile));
        let profile = Profile::load(&source).map_err(|d| {
            CliError::Usage(format!(
                "--profile {}: {}",
                args.profile,
                d.iter()
                    .map(|d| d.message.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })?;
        if profile.mqtt.is_some() {
            return Err(CliError::Usage(format!(
                "--profile {}: an MQTT meter profile; the load test polls Modbus meters",
                args.profile
            )));
        }
        let profiles = dir.join("profiles");
        std::fs::create_dir_all(&profiles).map_err(rt)?;
        std::fs::copy(&source, profiles.join(format!("{}.toml", args.profile)))
            .map_err(|e| CliError::Runtime(format!("cannot copy {}: {e}", source.display())))?;
        crate::seal::handover::generate_one_box(&dir.join("hub-keys"), &dir.join("keys"))
            .map_err(rt)?;

        let (broker, gateway_tls, hub_tls) = match &args.broker {
            None => {
                let ca = CertAuthority::generate(&dir.join("tls"), "citygate loadtest CA")
                    .map_err(rt)?;
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
                let (gw, hub) = (client(&args.gateway_id)?, client(&args.hub_id)?);
                let plan = BrokerPlan::Own {
                    port: free_port()?,
                    cert: server.cert,
                    key: server.key,
                    ca: ca.ca_file().to_owned(),
                };
                (plan, Some(gw), Some(hub))
            }
            Some(address) => {
                let tls = |cert: &Option<PathBuf>, key: &Option<PathBuf>| match (
                    &args.ca_file,
                    cert,
                    key,
                ) {
                    (Some(ca), Some(cert), Some(key)) => Some(ClientTls {
                        ca: ca.clone(),
                        cert: cert.clone(),
                        key: key.clone(),
                    }),
                    _ => None,
                };
                let gw = tls(&args.gateway_cert_file, &args.gateway_key_file);
                let hub = tls(&args.hub_cert_file, &args.hub_key_file);
                if (gw.is_none() || hub.is_none()) && !args.broker_danger_plaintext {
                    return Err(CliError::Usage(
                        "--broker needs --ca-file, --gateway-cert-file, --gateway-key-file, \
                         --hub-cert-file and --hub-key-file (or --broker-danger-plaintext)"
                            .into(),
                    ));
                }
                let plan = BrokerPlan::External {
                    address: address.clone(),
                };
                (plan, gw, hub)
            }
        };
        let setup = Setup {
            dir: dir.to_owned(),
            profile: Arc::new(profile),
            broker,
            gateway_tls,
            hub_tls,
            gateway_id: args.gateway_id.clone(),
            hub_id: args.hub_id.clone(),
            hub_status: loopback(free_port()?),
            gateway_status: loopback(free_port()?),
            endpoints: split(args.meters(), args.per_endpoint),
            hub_config: dir.join("hub.toml"),
            gateway_config: dir.join("gateway.toml"),
        };
        std::fs::write(&setup.hub_config, setup.hub_toml()?).map_err(rt)?;
        Ok(setup)
    }

    /// `host:port` of the broker as the gateway and hub dial it.
    pub(super) fn broker_address(&self) -> String {
        match &self.broker {
            BrokerPlan::Own { port, .. } => format!("localhost:{port}"),
            BrokerPlan::External { address } => address.clone(),
        }
    }

    fn mqtt_keys(&self, tls: Option<&ClientTls>) -> String {
        let broker = self.broker_address();
        match tls {
            Some(t) => format!(
                "broker = \"{broker}\"\nca_file = {}\ncert_file = {}\nkey_file = {}\n",
                q(&t.ca),
                q(&t.cert),
                q(&t.key)
            ),
            None => format!("broker = \"{broker}\"\ndanger_plaintext = true\n"),
        }
    }

    /// The hub config, approving the policy the gateway will seal under (computed from its
    /// config as `citygate run` does; meter addresses do not enter the hash).
    fn hub_toml(&self) -> Result<String, CliError> {
        let placeholder: Vec<SocketAddr> = (1..=self.endpoints.len())
            .map(|port| SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap_or(1))))
            .collect();
        let text = self.gateway_toml(
            &placeholder,
            std::time::Duration::from_secs(1),
            Transport::Tcp,
        );
        let cfg = crate::config::GatewayConfig::parse(&self.gateway_config, &text, None)
            .map_err(CliError::Config)?;
        let approvals = crate::supervisor::approval_toml(&crate::supervisor::policy_stamps(&cfg));
        Ok(format!(
            "[hub]\nid = \"{hub}\"\nhpke_secret_key = \"hub-keys/hub.hpke.key\"\n\
             ack_signing_key = \"hub-keys/hub.ack.key\"\nstate_path = \"hub-state\"\n\n\
             [sink]\ntype = \"jsonl\"\npath = \"records.jsonl\"\n\n\
             [mqtt]\n{mqtt}\n[status]\nlisten = \"{status}\"\n\n\
             [[gateway]]\nid = \"{gw}\"\nverifying_key = \"keys/gateway.sign.pub\"\n\
             policies = {approvals}\n",
            hub = self.hub_id,
            gw = self.gateway_id,
            mqtt = self.mqtt_keys(self.hub_tls.as_ref()),
            status = self.hub_status,
        ))
    }

    /// The fields the purpose passes: every readings field of the profile, so each poll
    /// gives records on one stream.
    pub(super) fn purpose_fields(&self) -> Vec<String> {
        let fields: BTreeSet<String> = self
            .profile
            .fields
            .iter()
            .filter(|f| f.stream == Stream::Readings)
            .map(|f| f.name.as_str().to_owned())
            .collect();
        fields.into_iter().collect()
    }

    /// Writes the gateway config: meter `k` is unit `u` of endpoint `i` at `addresses[i]`.
    pub(super) fn write_gateway_config(
        &self,
        addresses: &[SocketAddr],
        interval: std::time::Duration,
        transport: Transport,
    ) -> Result<(), CliError> {
        let text = self.gateway_toml(addresses, interval, transport);
        std::fs::write(&self.gateway_config, text).map_err(rt)
    }

    /// The gateway config text (see [`Setup::write_gateway_config`]).
    fn gateway_toml(
        &self,
        addresses: &[SocketAddr],
        interval: std::time::Duration,
        transport: Transport,
    ) -> String {
        let mut text = format!(
            "[gateway]\nid = \"{gw}\"\nprofiles_dir = \"profiles\"\n\n\
             [purpose]\nname = \"loadtest\"\nfields = {fields:?}\n\n\
             [store]\npath = \"store\"\n\n\
             [keys]\nsigning_key = \"keys/gateway.sign.key\"\nhub_public_key = \"keys/hub.hpke.pub\"\n\
             pseudonym_key = \"keys/pseudonym.key\"\nhub_ack_key = \"keys/hub.ack.pub\"\n\n\
             [uplink]\n{mqtt}\n[status]\nlisten = \"{status}\"\n\n",
            gw = self.gateway_id,
            fields = self.purpose_fields(),
            mqtt = self.mqtt_keys(self.gateway_tls.as_ref()),
            status = self.gateway_status,
        );
        let kind = match transport {
            Transport::Tcp => "tcp",
            Transport::RtuTcp => "rtu_tcp",
        };
        let interval_ms = interval.as_millis();
        let mut k = 0u32;
        for (units, address) in self.endpoints.iter().zip(addresses) {
            for unit in 1..=*units {
                k += 1;
                let _ = write!(
                    text,
                    "[[device]]\nname = \"{}\"\nprofile = \"{}\"\n\
                     transport = {{ type = \"{kind}\", address = \"{address}\" }}\n\
                     unit = {unit}\npoll_interval = \"{interval_ms}ms\"\n\n",
                    device_name(k),
                    self.profile.name,
                );
            }
        }
        text
    }

    /// Each meter's pseudonym as the gateway computes it, by (endpoint index, unit id).
    pub(super) fn subjects(&self) -> Result<Vec<Vec<String>>, CliError> {
        let key = keys::load_pseudonym_key(&self.dir.join("keys/pseudonym.key")).map_err(rt)?;
        let cfg = crate::config::GatewayConfig::load(&self.gateway_config)?;
        let policy = cfg
            .policies
            .flows
            .first()
            .ok_or_else(|| CliError::Runtime("the load-test config has no purpose flow".into()))?
            .policy
            .with_key(key);
        let mut k = 0u32;
        let mut out = Vec::new();
        for units in &self.endpoints {
            let mut row = Vec::new();
            for _ in 0..*units {
                k += 1;
                let id = DeviceId::new(device_name(k)).map_err(rt)?;
                row.push(policy.subject(&id));
            }
            out.push(row);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_split_over_endpoints_of_at_most_per_endpoint() {
        assert_eq!(split(20, 8), vec![8, 8, 4]);
        assert_eq!(split(16, 8), vec![8, 8]);
        assert_eq!(split(1, 247), vec![1]);
        assert_eq!(split(500, 100), vec![100; 5]);
    }

    #[test]
    fn meter_names_are_valid_device_ids() {
        assert_eq!(device_name(1), "m00001");
        assert!(DeviceId::new(device_name(99_999)).is_ok());
    }
}

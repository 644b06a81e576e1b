//! Config text for the integration tests, built from parts: one gateway config and one
//! hub config, each with the defaults every test shares (test keys under `keys/`, a store
//! and hub state next to the config) and a method per part a test varies. A schema change
//! is made here once, not in every test module.

use std::path::{Path, PathBuf};

use citygate::mqtt::CertAuthority;

/// The CA, certificate and key files one TLS party presents.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// A client certificate for `name` issued by `ca`.
    pub fn client(ca: &CertAuthority, name: &str) -> Self {
        let files = ca.issue_client(name).unwrap();
        Self {
            ca: ca.ca_file().to_path_buf(),
            cert: files.cert,
            key: files.key,
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1 issued by `ca`.
    pub fn localhost_server(ca: &CertAuthority) -> Self {
        let files = ca.issue_localhost_server().unwrap();
        Self {
            ca: ca.ca_file().to_path_buf(),
            cert: files.cert,
            key: files.key,
        }
    }

    /// `ca_file`, `cert_file` and `key_file` keys, one a line.
    fn keys(&self) -> String {
        format!(
            "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            self.ca.display().to_string(),
            self.cert.display().to_string(),
            self.key.display().to_string(),
        )
    }
}

/// The shipped `firmware-profiles/` directory.
pub fn shipped_profiles_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles")
}

/// A `citygate run` config: `[gateway]`, `[purpose]`, `[batch]`, `[store]`, `[keys]`,
/// then optional `[modbus]`, `[uplink]`, `[status]` sections and the devices.
#[derive(Debug, Clone)]
pub struct GatewayToml {
    id: String,
    profiles_dir: Option<PathBuf>,
    fields: Vec<String>,
    /// `[policies]` body replacing the legacy `[purpose]` allow-list.
    policies: Option<String>,
    batch: String,
    sections: String,
    devices: String,
}

impl GatewayToml {
    /// Gateway `id` minimising to `fields`, batches closing after 200 ms, no devices.
    pub fn new(id: &str, fields: &[&str]) -> Self {
        Self {
            id: id.to_string(),
            profiles_dir: None,
            fields: fields.iter().map(|f| f.to_string()).collect(),
            policies: None,
            batch: "max_age = \"200ms\"\n".to_string(),
            sections: String::new(),
            devices: String::new(),
        }
    }

    /// Loads profiles from the shipped directory (what a child `citygate run` needs).
    pub fn shipped_profiles(mut self) -> Self {
        self.profiles_dir = Some(shipped_profiles_dir());
        self
    }

    /// Replaces the legacy `[purpose]` allow-list by `[policies]` flows `flows` from the
    /// policy files in `dir`, alarms under `alarms` (if any).
    pub fn policies(mut self, dir: &Path, flows: &[&str], alarms: Option<&str>) -> Self {
        let alarms = alarms
            .map(|a| format!("alarms = {a:?}\n"))
            .unwrap_or_default();
        self.policies = Some(format!(
            "[policies]\ndir = {:?}\nflows = {flows:?}\n{alarms}",
            dir.display().to_string()
        ));
        self
    }

    /// Adds `[policies] emergency = names` (after [`GatewayToml::policies`]).
    pub fn emergency(mut self, names: &[&str]) -> Self {
        let p = self.policies.as_mut().expect("policies() first");
        p.push_str(&format!("emergency = {names:?}\n"));
        self
    }

    /// Replaces the `[batch]` section's body, e.g. `max_age = "60s"`.
    pub fn batch(mut self, body: &str) -> Self {
        self.batch = format!("{body}\n");
        self
    }

    /// A `[modbus]` section with this request timeout and reconnect backoff cap.
    pub fn modbus(self, timeout: &str, backoff_max: &str) -> Self {
        self.section(&format!(
            "[modbus]\ntimeout = \"{timeout}\"\nbackoff_max = \"{backoff_max}\"\n"
        ))
    }

    /// A `[status]` endpoint on a loopback port of the gateway's choosing.
    pub fn status(self) -> Self {
        self.section("[status]\nlisten = \"127.0.0.1:0\"\n")
    }

    /// An `[uplink]` to the broker on loopback `port` with mutual TLS as `client`;
    /// `extra` holds further keys (e.g. `ack_timeout = "2s"`).
    pub fn uplink(self, port: u16, client: &TlsFiles, extra: &str) -> Self {
        self.section(&format!(
            "[uplink]\nbroker = \"localhost:{port}\"\n{}{extra}\n",
            client.keys()
        ))
    }

    /// Any further section, written before the devices.
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push_str(text);
        self.sections.push('\n');
        self
    }

    /// Appends `[[device]]` (and `[[mqtt_source]]`) tables.
    pub fn devices(mut self, text: &str) -> Self {
        self.devices.push_str(text);
        self
    }

    pub fn text(&self) -> String {
        let profiles_dir = self
            .profiles_dir
            .as_ref()
            .map(|d| format!("profiles_dir = {:?}\n", d.display().to_string()))
            .unwrap_or_default();
        let purpose = self
            .policies
            .clone()
            .unwrap_or_else(|| format!("[purpose]\nname = \"test\"\nfields = {:?}\n", self.fields));
        format!(
            "[gateway]\nid = \"{id}\"\n{profiles_dir}\n\
             {purpose}\n\
             [batch]\n{batch}\n\
             [store]\npath = \"store\"\n\n\
             [keys]\nsigning_key = \"keys/gateway.sign.key\"\nhub_public_key = \"keys/hub.hpke.pub\"\n\
             pseudonym_key = \"keys/pseudonym.key\"\nhub_ack_key = \"keys/hub.ack.pub\"\n\n\
             {sections}{devices}",
            id = self.id,
            batch = self.batch,
            sections = self.sections,
            devices = self.devices,
        )
    }

    /// Writes `gateway.toml` into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("gateway.toml");
        std::fs::write(&path, self.text()).unwrap();
        path
    }
}

/// A Modbus TCP meter.
pub fn device_toml(name: &str, profile: &str, address: &str, unit: u8, interval: &str) -> String {
    transport_device(
        name,
        profile,
        &format!("type = \"tcp\", address = \"{address}\""),
        unit,
        interval,
    )
}

/// A meter behind `transport`, the inside of the transport's inline table.
pub fn transport_device(
    name: &str,
    profile: &str,
    transport: &str,
    unit: u8,
    interval: &str,
) -> String {
    format!(
        "[[device]]\nname = \"{name}\"\nprofile = \"{profile}\"\ntransport = {{ {transport} }}\n\
         unit = {unit}\npoll_interval = \"{interval}\"\n\n"
    )
}

/// An `[[mqtt_source]]` on the broker on loopback `port` with mutual TLS; `extra` holds
/// further keys (e.g. `qos = 0`).
pub fn mqtt_source_toml(name: &str, port: u16, client: &TlsFiles, extra: &str) -> String {
    format!(
        "[[mqtt_source]]\nname = \"{name}\"\nbroker = \"localhost:{port}\"\n{}{extra}\n\n",
        client.keys()
    )
}

/// A meter publishing on `topic` through MQTT source `source`; `key` picks it out of a
/// topic filter.
pub fn mqtt_device_toml(
    name: &str,
    profile: &str,
    source: &str,
    topic: &str,
    key: Option<&str>,
) -> String {
    let key = key.map(|k| format!(", key = \"{k}\"")).unwrap_or_default();
    format!(
        "[[device]]\nname = \"{name}\"\nprofile = \"{profile}\"\n\
         transport = {{ type = \"mqtt\", source = \"{source}\", topic = \"{topic}\"{key} }}\n\n"
    )
}

/// A `citygate hub` config: hub `hub-1` writing `records.jsonl`, state in `hub-state`,
/// gateway `gw-test` registered with the test deployment's key.
#[derive(Debug, Clone)]
pub struct HubToml {
    mqtt: String,
    status: bool,
    /// `{ purpose, hash }` entries approved for gw-test.
    policies: Vec<String>,
}

impl HubToml {
    /// Connects to the broker on loopback `port` without TLS.
    pub fn plaintext(port: u16) -> Self {
        Self {
            mqtt: format!("broker = \"localhost:{port}\"\ndanger_plaintext = true\n"),
            status: false,
            policies: Vec::new(),
        }
    }

    /// Connects to the broker on loopback `port` with mutual TLS as `client`.
    pub fn client(port: u16, client: &TlsFiles) -> Self {
        Self {
            mqtt: format!("broker = \"localhost:{port}\"\n{}", client.keys()),
            status: false,
            policies: Vec::new(),
        }
    }

    /// Runs its own broker on `listen` (mutual TLS as `server`, clients verified against
    /// the server's CA) and connects to it as `client`.
    pub fn embedded_broker(listen: &str, client: &TlsFiles, server: &TlsFiles) -> Self {
        Self {
            mqtt: format!(
                "{}embedded_broker = {{ listen = \"{listen}\", cert_file = {:?}, key_file = {:?}, client_ca_file = {:?} }}\n",
                client.keys(),
                server.cert.display().to_string(),
                server.key.display().to_string(),
                server.ca.display().to_string(),
            ),
            status: false,
            policies: Vec::new(),
        }
    }

    /// A `[status]` endpoint on a loopback port of the hub's choosing.
    pub fn status(mut self) -> Self {
        self.status = true;
        self
    }

    /// Approves `stamp` for gw-test (see [`policy_stamp`](super::policy_stamp) for a
    /// gateway config's own).
    pub fn approve(mut self, stamp: &citygate::seal::PolicyStamp) -> Self {
        self.policies.push(format!(
            "{{ purpose = \"{}\", hash = \"{}\" }}",
            stamp.purpose,
            stamp.hash_hex()
        ));
        self
    }

    pub fn text(&self) -> String {
        let status = if self.status {
            "[status]\nlisten = \"127.0.0.1:0\"\n\n"
        } else {
            ""
        };
        format!(
            "[hub]\nid = \"hub-1\"\nhpke_secret_key = \"keys/hub.hpke.key\"\nack_signing_key = \"keys/hub.ack.key\"\nstate_path = \"hub-state\"\n\n\
             [sink]\ntype = \"jsonl\"\npath = \"records.jsonl\"\n\n\
             [mqtt]\n{mqtt}\n{status}\
             [[gateway]]\nid = \"gw-test\"\nverifying_key = \"keys/gateway.sign.pub\"\n\
             policies = [{policies}]\n",
            mqtt = self.mqtt,
            policies = self.policies.join(", "),
        )
    }

    /// Writes `hub.toml` into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("hub.toml");
        std::fs::write(&path, self.text()).unwrap();
        path
    }
}

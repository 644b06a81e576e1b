//! Gateway configuration: TOML parsed once into validated types.
//!
//! `raw` holds the serde structs (`deny_unknown_fields`, spans kept where semantic
//! errors can occur); [`GatewayConfig::load`] converts them, resolving relative paths
//! against the config file's directory and profiles by name, and returns every error
//! found as a located [`Diagnostic`]. Past this point a device always has a loaded
//! profile, a valid unit id and a positive poll interval.

mod device;
use crate::diag;
pub mod duration;
pub mod log;
pub(crate) mod mqtt;
mod peer_net;
mod policies;
mod raw;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(crate) use diag::Diagnostic;
pub(crate) use mqtt::MqttSourceConfig;
pub use peer_net::PeerNet;
pub use policies::{FlowConfig, PolicyConfig, PolicySource};

use crate::profile::line::LineOverride;
use crate::profile::{Profile, ProfileSet, Ratios};
use crate::reading::{DeviceId, GatewayId, UnitId};

/// Every problem found in a config and the profiles it uses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl From<Vec<Diagnostic>> for ConfigError {
    fn from(diagnostics: Vec<Diagnostic>) -> Self {
        Self { diagnostics }
    }
}

/// How a Modbus device is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// Modbus TCP (also serial servers and DTUs in Modbus TCP mode): `host:port`.
    Tcp { address: String },
    /// Modbus RTU on a local serial port (RS-485 adapter).
    Serial { port: String, line: LineOverride },
    /// Modbus RTU over TCP: a serial device server or a DTU in transparent mode.
    RtuTcp { address: String, line: LineOverride },
    /// Modbus RTU through a DTU that dials in to `listen` and registers with `id`.
    Dtu {
        id: String,
        listen: String,
        /// Heartbeat packet the DTU sends between frames (filtered out); default `id`.
        heartbeat: Option<String>,
        line: LineOverride,
        /// Networks the listener accepts connections from; empty: any.
        allow: Vec<PeerNet>,
    },
}

impl Transport {
    /// Whether the transport speaks Modbus RTU (one bus task per transport).
    pub(crate) fn is_rtu(&self) -> bool {
        matches!(
            self,
            Transport::Serial { .. } | Transport::RtuTcp { .. } | Transport::Dtu { .. }
        )
    }

    /// Explicit serial settings of an RTU transport.
    pub(crate) fn line(&self) -> Option<LineOverride> {
        match self {
            Transport::Serial { line, .. }
            | Transport::RtuTcp { line, .. }
            | Transport::Dtu { line, .. } => Some(*line),
            Transport::Tcp { .. } => None,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Tcp { address } => write!(f, "tcp://{address}"),
            Transport::Serial { port, .. } => write!(f, "serial://{port}"),
            Transport::RtuTcp { address, .. } => write!(f, "rtu+tcp://{address}"),
            Transport::Dtu { id, listen, .. } => write!(f, "dtu://{id}@{listen}"),
        }
    }
}

/// Where an MQTT meter publishes: the broker of `[[mqtt_source]]` `source`, on `topic`;
/// with a `+` level in `topic`, `key` is the value of that level that names this device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MqttTopic {
    pub source: String,
    pub topic: String,
    pub key: Option<String>,
    /// The meter is stale when no usable message arrived for this long (`expect_every`).
    pub expect_every: Option<Duration>,
}

impl fmt::Display for MqttTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mqtt source {} topic {}", self.source, self.topic)?;
        self.key
            .as_ref()
            .map_or(Ok(()), |k| write!(f, " (+ = {k})"))
    }
}

/// A meter the gateway polls over Modbus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModbusDevice {
    pub transport: Transport,
    pub unit: UnitId,
    pub poll_interval: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// How a device is reached and scheduled, per transport kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// Polled over Modbus TCP or RTU.
    Modbus(ModbusDevice),
    /// Publishes to a broker on its own schedule: no unit id, no poll interval.
    Mqtt(MqttTopic),
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Modbus(m) => m.transport.fmt(f),
            DeviceKind::Mqtt(t) => t.fmt(f),
        }
    }
}

/// One meter.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub id: DeviceId,
    pub profile: Arc<Profile>,
    pub kind: DeviceKind,
    pub location: Option<String>,
    /// The area policies aggregate it in (`area = "feeder-7"`); `None`: in no area.
    pub area: Option<crate::reading::AreaId>,
    /// Transformer ratios of a secondary-side meter (`ct_ratio`, `pt_ratio`; 1 and 1
    /// when not set).
    pub ratios: Ratios,
}

impl DeviceConfig {
    /// The Modbus part of a polled device.
    pub fn modbus(&self) -> Option<&ModbusDevice> {
        match &self.kind {
            DeviceKind::Modbus(m) => Some(m),
            DeviceKind::Mqtt(_) => None,
        }
    }

    /// The topic of an MQTT device.
    pub(crate) fn mqtt(&self) -> Option<&MqttTopic> {
        match &self.kind {
            DeviceKind::Mqtt(t) => Some(t),
            DeviceKind::Modbus(_) => None,
        }
    }
}

/// The largest sealed batch the gateway makes, in bytes: the batcher seals a batch early
/// rather than let its estimated sealed size pass this (whatever `max_records` says), and
/// `store.max_bytes` may not be smaller. Half the MQTT link's 1 MiB packet limit.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;

/// When an open batch is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_age: Duration,
    /// Shortest time between two seals of a stream at the end of poll rounds
    /// (see `crate::pipeline::Batcher`).
    pub min_interval: Duration,
    pub max_records: usize,
    /// An alarm-stream field is sent when its value or quality changes, and otherwise
    /// at least this often (its standing state).
    pub alarm_state_every: Duration,
    /// How often the aggregate windows are checkpointed on their own while samples arrive
    /// (`pipeline::checkpoint`): what a crash can cost of an open window.
    pub checkpoint_every: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub cache_capacity_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPaths {
    pub signing_key: PathBuf,
    pub hub_public_key: PathBuf,
    pub pseudonym_key: PathBuf,
    /// The hub's ack-verifying key: only acks it signed delete batches.
    pub hub_ack_key: PathBuf,
}

/// Defaults for Modbus polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModbusConfig {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub backoff_max: Duration,
}

/// Client TLS files for an MQTT connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TlsFiles {
    /// The link TLS of a validated config section: its files, or plaintext where the config
    /// said `danger_plaintext` (`None`). Callers log the plaintext case in their terms.
    pub(crate) fn link_tls(files: Option<&TlsFiles>) -> crate::mqtt::LinkTls {
        match files {
            Some(t) => crate::mqtt::LinkTls::Files(crate::mqtt::TlsClientFiles {
                ca: t.ca_file.clone(),
                cert: t.cert_file.clone(),
                key: t.key_file.clone(),
            }),
            None => crate::mqtt::LinkTls::DangerPlaintext,
        }
    }
}

/// Validates an MQTT section's TLS keys: all three files, or none with
/// `danger_plaintext`. The error says what is missing and what would be valid.
pub(crate) fn tls_files(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    danger_plaintext: bool,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<TlsFiles>, String> {
    match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles {
            ca_file: resolve(&ca),
            cert_file: resolve(&cert),
            key_file: resolve(&key),
        })),
        (None, None, None) if danger_plaintext => Ok(None),
        (ca, cert, key) => {
            let missing: Vec<&str> = [
                ("ca_file", ca.is_none()),
                ("cert_file", cert.is_none()),
                ("key_file", key.is_none()),
            ]
            .into_iter()
            .filter_map(|(k, missing)| missing.then_some(k))
            .collect();
            Err(format!(
                "TLS needs ca_file, cert_file and key_file; missing: {} \
                 (or, for development only, set danger_plaintext = true and none of them)",
                missing.join(", ")
            ))
        }
    }
}

/// Where and how the gateway forwards committed batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// `host:port`; the host is the name the broker's certificate must carry.
    pub broker: String,
    pub client_id: String,
    /// `None` only with `danger_plaintext`.
    pub tls: Option<TlsFiles>,
    pub window: usize,
    pub ack_timeout: Duration,
    /// Reconnect delays (`reconnect_initial`, `reconnect_max`).
    pub reconnect: crate::backoff::BackoffPolicy,
}

/// The local status endpoint (`/status`, `/metrics`, `/health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusConfig {
    /// `None`: disabled (`listen = "off"`).
    pub listen: Option<std::net::SocketAddr>,
}

/// Where the status endpoint listens unless the config says otherwise.
pub(crate) const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:9187";

/// Longest DTU registration id a `dtu` transport may name, in bytes.
pub(crate) const MAX_DTU_REGISTRATION: usize = 128;

/// Shortest `reconnect_initial`: below it a dead broker is hammered.
const MIN_RECONNECT_INITIAL: std::time::Duration = std::time::Duration::from_millis(10);
/// Longest `reconnect_max`.
const MAX_RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// Validates `reconnect_initial` and `reconnect_max` of `section` (`uplink` of the gateway,
/// `mqtt` of the hub); absent keys take [`BackoffPolicy::RECONNECT`]'s values.
///
/// [`BackoffPolicy::RECONNECT`]: crate::backoff::BackoffPolicy::RECONNECT
pub(crate) fn reconnect_policy(
    section: &str,
    initial: Option<toml::Spanned<duration::HumanDuration>>,
    max: Option<toml::Spanned<duration::HumanDuration>>,
    src: &diag::SourceFile,
    errors: &mut Vec<diag::Diagnostic>,
) -> crate::backoff::BackoffPolicy {
    let default = crate::backoff::BackoffPolicy::RECONNECT;
    let mut policy = crate::backoff::BackoffPolicy {
        initial: initial.as_ref().map_or(default.initial, |d| d.get_ref().0),
        max: max.as_ref().map_or(default.max, |d| d.get_ref().0),
    };
    if let Some(i) = &initial {
        if policy.initial < MIN_RECONNECT_INITIAL || policy.initial > MAX_RECONNECT_MAX {
            errors.push(src.at(
                i.span(),
                format!("{section}.reconnect_initial"),
                "valid: 10ms to 10m, e.g. \"200ms\"",
            ));
            policy.initial = default.initial;
        }
    }
    match &max {
        Some(m) if policy.max > MAX_RECONNECT_MAX => errors.push(src.at(
            m.span(),
            format!("{section}.reconnect_max"),
            "valid: at most 10m, e.g. \"2s\"",
        )),
        Some(m) if policy.max < policy.initial => errors.push(src.at(
            m.span(),
            format!("{section}.reconnect_max"),
            format!(
                "must be at least reconnect_initial ({}), e.g. \"2s\"",
                humantime::format_duration(policy.initial)
            ),
        )),
        None if policy.max < policy.initial => policy.max = policy.initial,
        _ => {}
    }
    policy
}

/// The `[status]` section as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStatus {
    listen: toml::Spanned<String>,
    #[serde(default)]
    danger_non_loopback: bool,
}

/// Validates a `[status]` section (gateway and hub share it); `default` applies when the
/// section is absent.
pub(crate) fn status_config(
    raw: Option<RawStatus>,
    src: &diag::SourceFile,
    errors: &mut Vec<diag::Diagnostic>,
    default: &str,
) -> StatusConfig {
    let Some(raw) = raw else {
        return StatusConfig {
            listen: default.parse().ok(),
        };
    };
    let text = raw.listen.get_ref().trim();
    if text == "off" {
        return StatusConfig { listen: None };
    }
    match text.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() || raw.danger_non_loopback => {
            StatusConfig { listen: Some(addr) }
        }
        Ok(addr) => {
            errors.push(src.at(
                raw.listen.span(),
                "status.listen",
                format!(
                    "{addr} is not a loopback address: the endpoint has no authentication; \
                     use 127.0.0.1 or ::1, or set danger_non_loopback = true"
                ),
            ));
            StatusConfig { listen: None }
        }
        Err(_) => {
            errors.push(src.at(
                raw.listen.span(),
                "status.listen",
                format!(
                    "{text:?} is not an IP:port address; valid: e.g. \"127.0.0.1:9187\", \"[::1]:9187\", or \"off\""
                ),
            ));
            StatusConfig { listen: None }
        }
    }
}

/// A validated gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub path: PathBuf,
    pub gateway_id: GatewayId,
    pub profiles_dir: PathBuf,
    pub profiles: ProfileSet,
    /// The purpose flows and their policies.
    pub policies: PolicyConfig,
    pub batch: BatchConfig,
    pub store: StoreConfig,
    pub keys: KeyPaths,
    pub modbus: ModbusConfig,
    pub devices: Vec<DeviceConfig>,
    /// `None`: store only (batches wait in the outbox).
    pub uplink: Option<UplinkConfig>,
    pub status: StatusConfig,
    /// How log lines are written (`[log]`).
    pub log: log::LogConfig,
    /// Brokers that MQTT meters publish to.
    pub mqtt_sources: Vec<MqttSourceConfig>,
}

/// Reads a config file, turning an I/O failure into a diagnostic about the whole file.
pub(crate) fn read_config_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigError::from(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            key: String::new(),
            message: format!("cannot read config: {e}"),
        }])
    })
}

/// Resolves `p` against `base` (the config file's directory) unless it is absolute.
/// Where the packages install the shipped profiles.
pub(crate) const INSTALLED_PROFILES_DIR: &str = "/usr/share/citygate/firmware-profiles";

/// The profile directory of a config in `base` that sets no `profiles_dir`: the first
/// directory of `firmware-profiles` beside the config and [`INSTALLED_PROFILES_DIR`]
/// (the first if neither exists), and the places looked in.
pub(crate) fn default_profiles_dir(base: &Path) -> (PathBuf, Vec<PathBuf>) {
    let places = vec![
        base.join("firmware-profiles"),
        PathBuf::from(INSTALLED_PROFILES_DIR),
    ];
    let found = places
        .iter()
        .find(|p| p.is_dir())
        .unwrap_or(&places[0])
        .clone();
    (found, places)
}

pub(crate) fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Whether `address` looks like `host:port` with a non-empty host and a u16 port.
pub(crate) fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

impl GatewayConfig {
    /// Reads, parses and validates a config file and the profiles it names.
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let text = read_config_text(path)?;
        raw::parse(path, &text, None)
    }

    /// Parses config text; `profiles` replaces loading `profiles_dir` (tests, demo).
    pub fn parse(
        path: &Path,
        text: &str,
        profiles: Option<ProfileSet>,
    ) -> Result<GatewayConfig, ConfigError> {
        raw::parse(path, text, profiles)
    }

    /// Profile names and versions in use, for the policy hash.
    pub(crate) fn profile_versions(&self) -> Vec<String> {
        let used: BTreeSet<String> = self
            .devices
            .iter()
            .map(|d| format!("{}@{}", d.profile.name, d.profile.version))
            .collect();
        used.into_iter().collect()
    }
}

//! The gateway config file as written, and its conversion into validated types.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::diag::{Diagnostic, SourceFile};
use super::duration::HumanDuration;
use super::{
    BatchConfig, ConfigError, DeviceConfig, GatewayConfig, KeyPaths, ModbusConfig, PurposeConfig,
    StoreConfig, Transport,
};
use crate::profile::{Profile, ProfileSet, Ratio, Ratios};
use crate::reading::{DeviceId, FieldName, GatewayId, UnitId};

const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    purpose: RawPurpose,
    #[serde(default)]
    batch: RawBatch,
    store: RawStore,
    keys: RawKeys,
    #[serde(default)]
    modbus: RawModbus,
    uplink: Option<RawUplink>,
    status: Option<super::RawStatus>,
    #[serde(rename = "mqtt_source", default)]
    mqtt_sources: Vec<super::mqtt::RawMqttSource>,
    #[serde(rename = "device", default)]
    devices: Vec<RawDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: Spanned<String>,
    profiles_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPurpose {
    name: String,
    description: Option<String>,
    fields: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    #[serde(default = "default_max_age")]
    max_age: Spanned<HumanDuration>,
    #[serde(default = "default_max_records")]
    max_records: Spanned<usize>,
    #[serde(default = "default_alarm_state_every")]
    alarm_state_every: Spanned<HumanDuration>,
}

fn default_alarm_state_every() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(15 * 60)))
}

fn default_max_age() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(1)))
}
fn default_max_records() -> Spanned<usize> {
    Spanned::new(0..0, 5000)
}

impl Default for RawBatch {
    fn default() -> Self {
        Self {
            max_age: default_max_age(),
            max_records: default_max_records(),
            alarm_state_every: default_alarm_state_every(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: PathBuf,
    #[serde(default = "default_store_max_bytes")]
    max_bytes: u64,
    #[serde(default = "default_cache_bytes")]
    cache_capacity_bytes: Spanned<u64>,
}

fn default_store_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_cache_bytes() -> Spanned<u64> {
    Spanned::new(0..0, 4 * 1024 * 1024)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    signing_key: PathBuf,
    hub_public_key: PathBuf,
    pseudonym_key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModbus {
    #[serde(default = "default_timeout")]
    timeout: HumanDuration,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: HumanDuration,
    #[serde(default = "default_backoff_max")]
    backoff_max: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3))
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl Default for RawModbus {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
            backoff_max: default_backoff_max(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    broker: Spanned<String>,
    client_id: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    danger_plaintext: bool,
    #[serde(default = "default_window")]
    window: Spanned<usize>,
    #[serde(default = "default_ack_timeout")]
    ack_timeout: HumanDuration,
}

fn default_window() -> Spanned<usize> {
    Spanned::new(0..0, 16)
}
fn default_ack_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: Spanned<String>,
    profile: Spanned<String>,
    transport: Spanned<RawTransport>,
    /// Required for Modbus transports; MQTT devices have none.
    unit: Option<Spanned<u8>>,
    poll_interval: Option<Spanned<HumanDuration>>,
    timeout: Option<HumanDuration>,
    location: Option<String>,
    /// Current-transformer ratio of a secondary-side meter (primary A / secondary A).
    ct_ratio: Option<Spanned<f64>>,
    /// Voltage-transformer ratio of a secondary-side meter (primary V / secondary V).
    pt_ratio: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum RawTransport {
    Tcp {
        address: String,
    },
    Serial {
        port: String,
        baud: Option<u32>,
        parity: Option<crate::profile::Parity>,
        data_bits: Option<u8>,
        stop_bits: Option<u8>,
    },
    #[serde(rename = "rtu_tcp")]
    RtuTcp {
        address: String,
        baud: Option<u32>,
        parity: Option<crate::profile::Parity>,
        data_bits: Option<u8>,
        stop_bits: Option<u8>,
    },
    Dtu {
        id: String,
        listen: String,
        heartbeat: Option<String>,
        baud: Option<u32>,
        parity: Option<crate::profile::Parity>,
        data_bits: Option<u8>,
        stop_bits: Option<u8>,
    },
    Mqtt {
        source: String,
        topic: String,
        key: Option<String>,
    },
}

/// Serial settings of an RTU transport; unset keys come from the profile's `[line]`.
fn line_override(
    baud: Option<u32>,
    parity: Option<crate::profile::Parity>,
    data_bits: Option<u8>,
    stop_bits: Option<u8>,
) -> crate::source::rtu::LineOverride {
    crate::source::rtu::LineOverride {
        baud,
        data_bits,
        parity,
        stop_bits,
    }
}

/// A device already configured whose RTU transport names the same port, server or
/// DTU id as `t` with different settings.
fn rtu_conflict(devices: &[DeviceConfig], t: &Transport) -> Option<DeviceId> {
    let key = |t: &Transport| match t {
        Transport::Serial { port, .. } => Some(format!("serial {port}")),
        Transport::RtuTcp { address, .. } => Some(format!("rtu_tcp {address}")),
        Transport::Dtu { id, .. } => Some(format!("dtu {id}")),
        _ => None,
    };
    let k = key(t)?;
    devices
        .iter()
        .find(|d| key(&d.transport).as_ref() == Some(&k) && &d.transport != t)
        .map(|d| d.id.clone())
}

pub(super) fn parse(
    path: &Path,
    text: &str,
    profiles: Option<ProfileSet>,
) -> Result<GatewayConfig, ConfigError> {
    let src = SourceFile::new(path, text);
    let raw: RawConfig = src.parse().map_err(|d| ConfigError::from(vec![d]))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &Path| super::resolve_path(&base, p);
    let mut errors: Vec<Diagnostic> = Vec::new();

    let gateway_id = GatewayId::new(raw.gateway.id.get_ref().clone())
        .map_err(|e| errors.push(src.at(raw.gateway.id.span(), "gateway.id", e.to_string())))
        .ok();
    let profiles_dir = resolve(
        raw.gateway
            .profiles_dir
            .as_deref()
            .unwrap_or(Path::new("../firmware-profiles")),
    );
    let profiles = match profiles {
        Some(p) => p,
        None => ProfileSet::load_dir(&profiles_dir).unwrap_or_else(|mut e| {
            errors.append(&mut e);
            ProfileSet::default()
        }),
    };
    let profiles_loaded = errors.is_empty();

    let batch = BatchConfig {
        max_age: raw.batch.max_age.get_ref().0,
        max_records: *raw.batch.max_records.get_ref(),
        alarm_state_every: raw.batch.alarm_state_every.get_ref().0,
    };
    if batch.alarm_state_every < Duration::from_secs(1) {
        errors.push(src.at(
            raw.batch.alarm_state_every.span(),
            "batch.alarm_state_every",
            "must be at least 1s, e.g. \"15m\"",
        ));
    }
    if batch.max_age.is_zero() || batch.max_age > Duration::from_secs(60) {
        errors.push(src.at(
            raw.batch.max_age.span(),
            "batch.max_age",
            "must be between 1ms and 60s",
        ));
    }
    if batch.max_records == 0 {
        errors.push(src.at(
            raw.batch.max_records.span(),
            "batch.max_records",
            "must be at least 1",
        ));
    }
    if *raw.store.cache_capacity_bytes.get_ref() > 64 * 1024 * 1024 {
        errors.push(src.at(
            raw.store.cache_capacity_bytes.span(),
            "store.cache_capacity_bytes",
            "more than 64 MiB of page cache defeats the memory budget; valid: up to 67108864",
        ));
    }
    let modbus = ModbusConfig {
        timeout: raw.modbus.timeout.0,
        connect_timeout: raw.modbus.connect_timeout.0,
        backoff_max: raw.modbus.backoff_max.0,
    };

    let mut mqtt_problems = Vec::new();
    let mqtt_sources = super::mqtt::sources(
        raw.mqtt_sources,
        raw.gateway.id.get_ref(),
        &resolve,
        &mut mqtt_problems,
    );
    let mut mqtt_routes = super::mqtt::DeviceRoutes::new(&mqtt_sources);

    let mut names = HashSet::new();
    let mut devices = Vec::with_capacity(raw.devices.len());
    for (i, d) in raw.devices.into_iter().enumerate() {
        let key = format!("device[{i}]");
        let id = DeviceId::new(d.name.get_ref().clone())
            .map_err(|e| errors.push(src.at(d.name.span(), format!("{key}.name"), e.to_string())))
            .ok();
        if let Some(id) = &id {
            if !names.insert(id.clone()) {
                errors.push(src.at(
                    d.name.span(),
                    format!("{key}.name"),
                    format!("device name `{id}` is used twice"),
                ));
            }
        }
        let profile = profiles.get(d.profile.get_ref()).cloned();
        if profile.is_none() && profiles_loaded {
            let valid: Vec<&str> = profiles.names().collect();
            errors.push(src.at(
                d.profile.span(),
                format!("{key}.profile"),
                format!(
                    "no profile named {:?} in {}; valid: {}",
                    d.profile.get_ref(),
                    profiles_dir.display(),
                    valid.join(", ")
                ),
            ));
        }
        let polled = !matches!(d.transport.get_ref(), RawTransport::Mqtt { .. });
        let unit = match &d.unit {
            Some(u) if !polled => {
                errors.push(src.at(
                    u.span(),
                    format!("{key}.unit"),
                    "an MQTT device has no unit id; remove `unit`",
                ));
                0
            }
            Some(u) if !(1..=247).contains(u.get_ref()) => {
                errors.push(src.at(
                    u.span(),
                    format!("{key}.unit"),
                    format!("unit id {} is not valid; valid: 1..=247", u.get_ref()),
                ));
                0
            }
            Some(u) => *u.get_ref(),
            None if polled => {
                errors.push(src.at(
                    d.name.span(),
                    format!("{key}.unit"),
                    "a Modbus device needs `unit = N` (its unit id, 1..=247)",
                ));
                0
            }
            None => 0,
        };
        let interval = match &d.poll_interval {
            Some(p) if !polled => {
                errors.push(src.at(
                    p.span(),
                    format!("{key}.poll_interval"),
                    "MQTT meters publish on their own schedule; remove `poll_interval`",
                ));
                Duration::ZERO
            }
            Some(p) if p.get_ref().0 < MIN_POLL_INTERVAL => {
                errors.push(src.at(
                    p.span(),
                    format!("{key}.poll_interval"),
                    "must be at least 100ms",
                ));
                MIN_POLL_INTERVAL
            }
            Some(p) => p.get_ref().0,
            None if polled => {
                errors.push(src.at(
                    d.name.span(),
                    format!("{key}.poll_interval"),
                    "a Modbus device needs `poll_interval`, e.g. \"15s\"",
                ));
                MIN_POLL_INTERVAL
            }
            None => Duration::ZERO,
        };
        let transport_span = d.transport.span();
        let transport = match d.transport.into_inner() {
            RawTransport::Tcp { address } => {
                if !super::is_host_port(&address) {
                    errors.push(src.at(
                        transport_span.clone(),
                        format!("{key}.transport.address"),
                        format!("{address:?} is not host:port, e.g. \"192.168.1.20:502\""),
                    ));
                }
                Transport::Tcp { address }
            }
            RawTransport::Serial {
                port,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => {
                if port.trim().is_empty() {
                    errors.push(src.at(
                        transport_span.clone(),
                        format!("{key}.transport.port"),
                        "is empty; name the serial device, e.g. \"/dev/ttyUSB0\"",
                    ));
                }
                Transport::Serial {
                    port,
                    line: line_override(baud, parity, data_bits, stop_bits),
                }
            }
            RawTransport::RtuTcp {
                address,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => {
                if !super::is_host_port(&address) {
                    errors.push(src.at(
                        transport_span.clone(),
                        format!("{key}.transport.address"),
                        format!("{address:?} is not host:port, e.g. \"10.0.0.5:4001\""),
                    ));
                }
                Transport::RtuTcp {
                    address,
                    line: line_override(baud, parity, data_bits, stop_bits),
                }
            }
            RawTransport::Dtu {
                id,
                listen,
                heartbeat,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => {
                if id.trim().is_empty()
                    || id.len() > crate::source::rtu::transport::MAX_REGISTRATION
                {
                    errors.push(src.at(
                        transport_span.clone(),
                        format!("{key}.transport.id"),
                        "must be the DTU's registration identifier (1..=128 bytes), e.g. its IMEI",
                    ));
                }
                if !super::is_host_port(&listen) {
                    errors.push(src.at(
                        transport_span.clone(),
                        format!("{key}.transport.listen"),
                        format!("{listen:?} is not host:port, e.g. \"0.0.0.0:9000\""),
                    ));
                }
                Transport::Dtu {
                    id,
                    listen,
                    heartbeat,
                    line: line_override(baud, parity, data_bits, stop_bits),
                }
            }
            RawTransport::Mqtt {
                source,
                topic,
                key: k,
            } => mqtt_routes
                .transport(d.name.get_ref(), source, topic.clone(), k)
                .unwrap_or_else(|m| {
                    errors.push(src.at(transport_span.clone(), format!("{key}.transport"), m));
                    Transport::Mqtt {
                        source: String::new(),
                        topic,
                        key: None,
                    }
                }),
        };
        let ratios = device_ratios(
            &src,
            &key,
            &mut errors,
            (d.ct_ratio.as_ref(), d.pt_ratio.as_ref()),
            profile.as_deref(),
        );
        if let Some(line) = transport.line() {
            for (k, msg) in line.problems() {
                errors.push(src.at(transport_span.clone(), format!("{key}.transport.{k}"), msg));
            }
        }
        if let Some(other) = rtu_conflict(&devices, &transport) {
            errors.push(src.at(
                transport_span.clone(),
                format!("{key}.transport"),
                format!("conflicts with device `{other}` on the same port or DTU: one bus needs one set of line settings (and a DTU id one listen address)"),
            ));
        }
        if let Some(Err(m)) = profile
            .as_ref()
            .map(|p| super::mqtt::profile_fits(&transport, p))
        {
            errors.push(src.at(d.profile.span(), format!("{key}.profile"), m));
        }
        if let (Some(id), Some(profile)) = (id, profile) {
            devices.push(DeviceConfig {
                id,
                profile,
                transport,
                unit: UnitId(unit),
                poll_interval: interval,
                timeout: d.timeout.map_or(modbus.timeout, |t| t.0),
                location: d.location,
                ratios,
            });
        }
    }

    let known: BTreeSet<&str> = devices
        .iter()
        .flat_map(|d| d.profile.fields.iter().map(|f| f.name.as_str()))
        .collect();
    let mut fields = BTreeSet::new();
    for f in &raw.purpose.fields {
        match FieldName::new(f.get_ref().clone()) {
            Ok(name) if known.contains(name.as_str()) || !profiles_loaded => {
                fields.insert(name);
            }
            Ok(name) => errors.push(src.at(
                f.span(),
                "purpose.fields",
                format!(
                    "`{name}` is not a field of any configured device's profile; valid: {}",
                    known.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            )),
            Err(e) => errors.push(src.at(f.span(), "purpose.fields", e.to_string())),
        }
    }

    let uplink = raw.uplink.and_then(|u| {
        if !super::is_host_port(u.broker.get_ref()) {
            errors.push(src.at(
                u.broker.span(),
                "uplink.broker",
                format!(
                    "{:?} is not host:port, e.g. \"hub.example.org:8883\"",
                    u.broker.get_ref()
                ),
            ));
        }
        if !(1..=1024).contains(u.window.get_ref()) {
            errors.push(src.at(u.window.span(), "uplink.window", "must be 1..=1024 batches"));
        }
        let tls = super::tls_files(
            u.ca_file,
            u.cert_file,
            u.key_file,
            u.danger_plaintext,
            &resolve,
        )
        .map_err(|msg| errors.push(src.at(u.broker.span(), "uplink", msg)))
        .ok()?;
        Some(super::UplinkConfig {
            client_id: u
                .client_id
                .unwrap_or_else(|| raw.gateway.id.get_ref().clone()),
            broker: u.broker.into_inner(),
            tls,
            window: u.window.into_inner(),
            ack_timeout: u.ack_timeout.0,
        })
    });

    let status = super::status_config(raw.status, &src, &mut errors, super::DEFAULT_STATUS_LISTEN);

    for (span, key, message) in mqtt_problems {
        errors.push(src.at(span, key, message));
    }
    if !errors.is_empty() {
        return Err(errors.into());
    }
    Ok(GatewayConfig {
        path: path.to_path_buf(),
        gateway_id: gateway_id.expect("invariant: no errors means the id parsed"),
        profiles_dir,
        profiles,
        purpose: PurposeConfig {
            name: raw.purpose.name,
            description: raw.purpose.description,
            fields,
        },
        batch,
        store: StoreConfig {
            path: resolve(&raw.store.path),
            max_bytes: raw.store.max_bytes,
            cache_capacity_bytes: raw.store.cache_capacity_bytes.into_inner(),
        },
        keys: KeyPaths {
            signing_key: resolve(&raw.keys.signing_key),
            hub_public_key: resolve(&raw.keys.hub_public_key),
            pseudonym_key: resolve(&raw.keys.pseudonym_key),
        },
        modbus,
        devices,
        uplink,
        status,
        mqtt_sources,
    })
}

/// A device's `ct_ratio`/`pt_ratio`: finite and > 0, and only where its profile has a
/// field the ratio applies to (a ratio nothing uses is a misconfiguration).
fn device_ratios(
    src: &SourceFile<'_>,
    key: &str,
    errors: &mut Vec<Diagnostic>,
    (ct, pt): (Option<&Spanned<f64>>, Option<&Spanned<f64>>),
    profile: Option<&Profile>,
) -> Ratios {
    let mut ratios = Ratios::UNITY;
    for (name, value, uses) in [
        ("ct_ratio", ct, [Ratio::Ct, Ratio::CtPt]),
        ("pt_ratio", pt, [Ratio::Pt, Ratio::CtPt]),
    ] {
        let Some(v) = value else { continue };
        let x = *v.get_ref();
        if !(x.is_finite() && x > 0.0) {
            errors.push(src.at(
                v.span(),
                format!("{key}.{name}"),
                format!("{name} {x} is not valid; valid: a number > 0 (primary / secondary, e.g. 40 for a 200/5 A CT)"),
            ));
            continue;
        }
        if let Some(p) = profile {
            if !p
                .fields
                .iter()
                .any(|f| f.ratio.is_some_and(|r| uses.contains(&r)))
            {
                errors.push(src.at(
                    v.span(),
                    format!("{key}.{name}"),
                    format!(
                        "profile {} has no field with ratio \"{}\" or \"ct_pt\", so {name} would change nothing; remove it or use a profile for the meter's secondary-side registers",
                        p.name, uses[0]
                    ),
                ));
                continue;
            }
        }
        match name {
            "ct_ratio" => ratios.ct = x,
            _ => ratios.pt = x,
        }
    }
    ratios
}

#[cfg(test)]
mod ratio_tests {
    use super::*;

    const RATIO_PROFILE: &str = r#"
[meter]
vendor = "T"
model = "R"
protocol = "modbus"
[modbus]
function = 3
[[field]]
name = "voltage_l1"
register = 0
type = "u16"
scale = 0.1
unit = "V"
ratio = "pt"
category = "measurement"
grade = "L2"
[[field]]
name = "active_power"
register = 1
type = "i32"
unit = "W"
ratio = "ct_pt"
category = "measurement"
grade = "L3"
"#;

    const CONFIG: &str = r#"[gateway]
id = "gw-1"

[purpose]
name = "grid"
fields = ["voltage_l1"]

[store]
path = "store"

[keys]
signing_key = "keys/gateway.sign.key"
hub_public_key = "keys/hub.hpke.pub"
pseudonym_key = "keys/pseudonym.key"

[[device]]
name = "m1"
profile = "test-r"
transport = { type = "tcp", address = "127.0.0.1:502" }
unit = 1
poll_interval = "1s"
"#;

    /// test-r (fields with ratios) and test-m (none).
    fn ratio_profiles() -> ProfileSet {
        let mut set = ProfileSet::default();
        set.insert(Profile::parse(Path::new("test-r.toml"), RATIO_PROFILE).unwrap());
        let plain = RATIO_PROFILE
            .replace("ratio = \"pt\"\n", "")
            .replace("ratio = \"ct_pt\"\n", "");
        set.insert(Profile::parse(Path::new("test-m.toml"), &plain).unwrap());
        set
    }

    fn parse_ratio(text: &str) -> Result<GatewayConfig, ConfigError> {
        parse(
            Path::new("/etc/citygate/gw.toml"),
            text,
            Some(ratio_profiles()),
        )
    }

    #[test]
    fn device_ratios_load_and_default_to_one() {
        let text = CONFIG.replace(
            "poll_interval = \"1s\"",
            "poll_interval = \"1s\"\nct_ratio = 40\npt_ratio = 100.0",
        );
        let c = parse_ratio(&text).unwrap();
        assert_eq!(
            c.devices[0].ratios,
            Ratios {
                ct: 40.0,
                pt: 100.0
            }
        );
        assert_eq!(c.devices[0].ratios.multiplier(Some(Ratio::CtPt)), 4000.0);
        assert_eq!(
            parse_ratio(CONFIG).unwrap().devices[0].ratios,
            Ratios::UNITY
        );
        assert_eq!(c.batch.alarm_state_every, Duration::from_secs(15 * 60));
    }

    #[test]
    fn bad_ratios_are_located() {
        let base = CONFIG;
        for bad in ["ct_ratio = 0", "ct_ratio = -5.0", "pt_ratio = nan"] {
            let text = base.replace(
                "poll_interval = \"1s\"",
                &format!("poll_interval = \"1s\"\n{bad}"),
            );
            let e = parse_ratio(&text).unwrap_err().diagnostics;
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            let key = bad.split(' ').next().unwrap();
            assert_eq!(e[0].key, format!("device[0].{key}"), "{}", e[0]);
            assert_eq!(e[0].line, 22, "{}", e[0]);
            assert!(e[0].message.contains("> 0"), "{}", e[0]);
        }
    }

    #[test]
    fn a_ratio_no_field_uses_is_rejected() {
        // test-m has no field with a ratio: a CT ratio there would silently do nothing.
        let text = CONFIG
            .replace("profile = \"test-r\"", "profile = \"test-m\"")
            .replace(
                "poll_interval = \"1s\"",
                "poll_interval = \"1s\"\nct_ratio = 40",
            );
        let e = parse_ratio(&text).unwrap_err().diagnostics;
        assert_eq!(e[0].key, "device[0].ct_ratio");
        assert!(e[0].message.contains("no field with ratio"), "{}", e[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;

    const PROFILE: &str = r#"
[meter]
vendor = "T"
model = "M"
protocol = "modbus"
[modbus]
function = 4
[[field]]
name = "voltage_l1"
register = 0
type = "f32"
unit = "V"
category = "measurement"
grade = "L2"
"#;

    const CONFIG: &str = r#"[gateway]
id = "gw-1"

[purpose]
name = "grid"
fields = ["voltage_l1"]

[store]
path = "store"

[keys]
signing_key = "keys/gateway.sign.key"
hub_public_key = "keys/hub.hpke.pub"
pseudonym_key = "keys/pseudonym.key"

[[device]]
name = "m1"
profile = "test-m"
transport = { type = "tcp", address = "127.0.0.1:502" }
unit = 1
poll_interval = "1s"
"#;

    fn profiles() -> ProfileSet {
        let mut set = ProfileSet::default();
        set.insert(Profile::parse(Path::new("test-m.toml"), PROFILE).unwrap());
        set
    }

    fn parse_str(text: &str) -> Result<GatewayConfig, ConfigError> {
        parse(Path::new("/etc/citygate/gw.toml"), text, Some(profiles()))
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = parse_str(CONFIG).unwrap();
        assert_eq!(c.gateway_id.as_str(), "gw-1");
        assert_eq!(c.store.path, Path::new("/etc/citygate/store"));
        assert_eq!(c.batch.max_age, Duration::from_secs(1));
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].timeout, Duration::from_secs(1));
        assert_eq!(c.store.cache_capacity_bytes, 4 * 1024 * 1024);
    }

    fn errors(text: &str) -> Vec<Diagnostic> {
        parse_str(text).unwrap_err().diagnostics
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = errors(&CONFIG.replace("unit = 1", "unit = 1\nbaud = 9600"));
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].line, e[0].key.as_str()),
            (21, "device.baud"),
            "{}",
            e[0]
        );
        assert!(e[0].to_string().starts_with("/etc/citygate/gw.toml:21:"));
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = CONFIG
            .replace("profile = \"test-m\"", "profile = \"nope\"")
            .replace("unit = 1", "unit = 0")
            .replace("poll_interval = \"1s\"", "poll_interval = \"10ms\"")
            .replace("[\"voltage_l1\"]", "[\"voltage_l9\"]");
        let e = errors(&text);
        let keys: Vec<&str> = e.iter().map(|d| d.key.as_str()).collect();
        assert!(keys.contains(&"device[0].profile"), "{keys:?}");
        assert!(keys.contains(&"device[0].unit"), "{keys:?}");
        assert!(keys.contains(&"device[0].poll_interval"), "{keys:?}");
        let profile_err = e.iter().find(|d| d.key == "device[0].profile").unwrap();
        assert!(
            profile_err.message.contains("valid: test-m"),
            "{profile_err}"
        );
        assert_eq!(profile_err.line, 18);
    }

    #[test]
    fn bad_duration_and_transport_are_explained() {
        let e = errors(&CONFIG.replace("poll_interval = \"1s\"", "poll_interval = \"soon\""));
        assert!(e[0].message.contains("e.g."), "{}", e[0]);
        assert_eq!(e[0].key, "device.poll_interval");
        let e = errors(&CONFIG.replace("type = \"tcp\"", "type = \"carrier-pigeon\""));
        assert!(e[0].message.contains("tcp"), "{}", e[0]);
        let e = errors(&CONFIG.replace("127.0.0.1:502", "127.0.0.1"));
        assert_eq!(e[0].key, "device[0].transport.address");
    }

    #[test]
    fn purpose_field_typos_are_caught() {
        let e = errors(&CONFIG.replace("[\"voltage_l1\"]", "[\"voltage_l9\"]"));
        assert_eq!(e[0].key, "purpose.fields");
        assert!(e[0].message.contains("valid: voltage_l1"));
    }

    #[test]
    fn status_endpoint_is_loopback_unless_opted_out() {
        let with = |section: &str| CONFIG.replace("[store]", &format!("{section}\n\n[store]"));
        let default = parse_str(CONFIG).unwrap().status.listen;
        assert_eq!(default, Some("127.0.0.1:9187".parse().unwrap()));
        let off = parse_str(&with("[status]\nlisten = \"off\"")).unwrap();
        assert_eq!(off.status.listen, None);
        let v6 = parse_str(&with("[status]\nlisten = \"[::1]:0\"")).unwrap();
        assert_eq!(v6.status.listen, Some("[::1]:0".parse().unwrap()));
        let e = errors(&with("[status]\nlisten = \"0.0.0.0:9187\""));
        assert_eq!(e[0].key, "status.listen");
        assert!(e[0].message.contains("danger_non_loopback"), "{}", e[0]);
        let open = parse_str(&with(
            "[status]\nlisten = \"0.0.0.0:9187\"\ndanger_non_loopback = true",
        ))
        .unwrap();
        assert_eq!(open.status.listen, Some("0.0.0.0:9187".parse().unwrap()));
        let e = errors(&with("[status]\nlisten = \"localhost\""));
        assert!(e[0].message.contains("\"off\""), "{}", e[0]);
        assert!(e[0].line > 0);
    }

    #[test]
    fn rtu_transports_parse_and_bad_values_are_located() {
        let serial = CONFIG.replace(
            "{ type = \"tcp\", address = \"127.0.0.1:502\" }",
            "{ type = \"serial\", port = \"/dev/ttyUSB0\", baud = 19200, parity = \"even\" }",
        );
        let c = parse_str(&serial).unwrap();
        let line = c.devices[0].transport.line().unwrap();
        assert_eq!(
            (line.baud, line.parity),
            (Some(19200), Some(crate::profile::Parity::Even))
        );
        let dtu = CONFIG.replace(
            "{ type = \"tcp\", address = \"127.0.0.1:502\" }",
            "{ type = \"dtu\", id = \"865000111\", listen = \"0.0.0.0:9000\" }",
        );
        assert!(parse_str(&dtu).unwrap().devices[0].transport.is_rtu());
        let e = errors(&serial.replace("19200", "9601"));
        assert_eq!(e[0].key, "device[0].transport.baud", "{}", e[0]);
        assert_eq!(e[0].line, 19);
        assert!(e[0].message.contains("valid"), "{}", e[0]);
        let e = errors(&serial.replace("\"even\"", "\"mark\""));
        assert!(e[0].message.contains("even"), "{}", e[0]);
        let e = errors(&serial.replace("baud = 19200", "speed = 19200"));
        assert!(e[0].message.contains("speed"), "{}", e[0]);
        let e = errors(&CONFIG.replace(
            "{ type = \"tcp\", address = \"127.0.0.1:502\" }",
            "{ type = \"rtu_tcp\", address = \"10.0.0.5\" }",
        ));
        assert_eq!(e[0].key, "device[0].transport.address");
    }
}

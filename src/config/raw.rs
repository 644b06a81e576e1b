//! The gateway config file as written, and its conversion into validated types.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::duration::HumanDuration;
use super::{BatchConfig, ConfigError, GatewayConfig, KeyPaths, ModbusConfig, StoreConfig};
use crate::diag::{Diagnostic, SourceFile};
use crate::profile::ProfileSet;
use crate::reading::{FieldName, GatewayId};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    purpose: Option<super::policies::RawPurpose>,
    policies: Option<super::policies::RawPolicies>,
    #[serde(default)]
    batch: RawBatch,
    store: RawStore,
    keys: RawKeys,
    #[serde(default)]
    modbus: RawModbus,
    uplink: Option<RawUplink>,
    status: Option<super::RawStatus>,
    log: Option<super::log::RawLog>,
    #[serde(rename = "mqtt_source", default)]
    mqtt_sources: Vec<super::mqtt::RawMqttSource>,
    #[serde(rename = "device", default)]
    devices: Vec<super::device::RawDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: Spanned<String>,
    profiles_dir: Option<Spanned<PathBuf>>,
    /// IANA time zone the policies' windows align to; default "UTC".
    time_zone: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    #[serde(default = "default_max_age")]
    max_age: Spanned<HumanDuration>,
    #[serde(default = "default_min_interval")]
    min_interval: Spanned<HumanDuration>,
    #[serde(default = "default_max_records")]
    max_records: Spanned<usize>,
    #[serde(default = "default_alarm_state_every")]
    alarm_state_every: Spanned<HumanDuration>,
    #[serde(default = "default_checkpoint_every")]
    checkpoint_every: Spanned<HumanDuration>,
}

fn default_checkpoint_every() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(DEFAULT_CHECKPOINT_EVERY))
}

/// Default interval of lone checkpoints of the aggregate windows while samples arrive.
pub(crate) const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

fn default_alarm_state_every() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(15 * 60)))
}

/// Default shortest gap between two round-end seals of a stream: at most ten batches a
/// second per stream however the pollers' rounds interleave.
pub(crate) const DEFAULT_MIN_INTERVAL: Duration = Duration::from_millis(100);

fn default_max_age() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(1)))
}
fn default_min_interval() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(DEFAULT_MIN_INTERVAL))
}
fn default_max_records() -> Spanned<usize> {
    Spanned::new(0..0, 5000)
}

impl Default for RawBatch {
    fn default() -> Self {
        Self {
            max_age: default_max_age(),
            min_interval: default_min_interval(),
            max_records: default_max_records(),
            alarm_state_every: default_alarm_state_every(),
            checkpoint_every: default_checkpoint_every(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: PathBuf,
    #[serde(default = "default_store_max_bytes")]
    max_bytes: Spanned<u64>,
    #[serde(default = "default_cache_bytes")]
    cache_capacity_bytes: Spanned<u64>,
}

fn default_store_max_bytes() -> Spanned<u64> {
    Spanned::new(0..0, 256 * 1024 * 1024)
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
    hub_ack_key: PathBuf,
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
    ack_timeout: Spanned<HumanDuration>,
    reconnect_initial: Option<Spanned<HumanDuration>>,
    reconnect_max: Option<Spanned<HumanDuration>>,
}

fn default_window() -> Spanned<usize> {
    Spanned::new(0..0, 16)
}
fn default_ack_timeout() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(10)))
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
    let (profiles_dir, looked_in) = match &raw.gateway.profiles_dir {
        Some(dir) => (resolve(dir.get_ref()), Vec::new()),
        None => super::default_profiles_dir(&base),
    };
    let profiles = match profiles {
        Some(p) => p,
        None if !profiles_dir.is_dir() => {
            let (span, message) = match &raw.gateway.profiles_dir {
                Some(dir) => (
                    dir.span(),
                    format!(
                        "{} is not a directory of device profiles",
                        profiles_dir.display()
                    ),
                ),
                None => (
                    raw.gateway.id.span(),
                    format!(
                        "not set, and no profile directory in the default places ({}); \
                         set [gateway] profiles_dir to the directory of device profiles",
                        looked_in
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            };
            errors.push(src.at(span, "gateway.profiles_dir", message));
            ProfileSet::default()
        }
        None => ProfileSet::load_dir(&profiles_dir).unwrap_or_else(|mut e| {
            errors.append(&mut e);
            ProfileSet::default()
        }),
    };
    let profiles_loaded = errors.is_empty();

    let batch = BatchConfig {
        max_age: raw.batch.max_age.get_ref().0,
        min_interval: raw.batch.min_interval.get_ref().0,
        max_records: *raw.batch.max_records.get_ref(),
        alarm_state_every: raw.batch.alarm_state_every.get_ref().0,
        checkpoint_every: raw.batch.checkpoint_every.get_ref().0,
    };
    if batch.checkpoint_every < Duration::from_millis(100) {
        errors.push(src.at(
            raw.batch.checkpoint_every.span(),
            "batch.checkpoint_every",
            "must be at least 100ms, e.g. \"30s\"",
        ));
    }
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
    if batch.min_interval > batch.max_age {
        errors.push(src.at(
            raw.batch.min_interval.span(),
            "batch.min_interval",
            format!(
                "must not exceed batch.max_age ({}), e.g. \"100ms\"",
                humantime::format_duration(batch.max_age)
            ),
        ));
    }
    let ceiling = crate::seal::MAX_RECORDS_PER_BATCH as usize;
    if batch.max_records == 0 || batch.max_records > ceiling {
        errors.push(src.at(
            raw.batch.max_records.span(),
            "batch.max_records",
            format!(
                "must be between 1 and {ceiling} (the most records a hub accepts in one batch)"
            ),
        ));
    }
    if *raw.store.max_bytes.get_ref() < super::MAX_BATCH_BYTES as u64 {
        errors.push(src.at(
            raw.store.max_bytes.span(),
            "store.max_bytes",
            format!(
                "the quota is smaller than the largest batch the gateway seals, so such a \
                 batch could never be stored; valid: at least {} (512 KiB)",
                super::MAX_BATCH_BYTES
            ),
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

    let devices = super::device::devices(
        raw.devices,
        &super::device::Context {
            src: &src,
            profiles: &profiles,
            profiles_dir: &profiles_dir,
            profiles_loaded,
            modbus: &modbus,
        },
        &mut mqtt_routes,
        &mut errors,
    );

    let known: BTreeSet<&str> = devices
        .iter()
        .flat_map(|d| d.profile.fields.iter().map(|f| f.name.as_str()))
        .collect();
    let mut fields = BTreeSet::new();
    for f in raw.purpose.iter().flat_map(|p| &p.fields) {
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

    let tz = super::policies::time_zone(&src, raw.gateway.time_zone.as_ref(), &mut errors);
    let policies = super::policies::resolve(
        &super::policies::Inputs {
            src: &src,
            path,
            base: &base,
            profiles: &profiles,
            profiles_loaded,
            tz,
        },
        raw.policies,
        raw.purpose.map(|p| (p, fields.into_iter().collect())),
        &mut errors,
    );

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
        if u.ack_timeout.get_ref().0 < Duration::from_secs(1) {
            errors.push(src.at(
                u.ack_timeout.span(),
                "uplink.ack_timeout",
                "valid: at least 1s, e.g. \"10s\"",
            ));
        }
        let reconnect = super::reconnect_policy(
            "uplink",
            u.reconnect_initial,
            u.reconnect_max,
            &src,
            &mut errors,
        );
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
            ack_timeout: u.ack_timeout.into_inner().0,
            reconnect,
        })
    });

    let status = super::status_config(raw.status, &src, &mut errors, super::DEFAULT_STATUS_LISTEN);
    let log = super::log::log_config(raw.log, &src, &mut errors);

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
        policies,
        batch,
        store: StoreConfig {
            path: resolve(&raw.store.path),
            max_bytes: raw.store.max_bytes.into_inner(),
            cache_capacity_bytes: raw.store.cache_capacity_bytes.into_inner(),
        },
        keys: KeyPaths {
            signing_key: resolve(&raw.keys.signing_key),
            hub_public_key: resolve(&raw.keys.hub_public_key),
            pseudonym_key: resolve(&raw.keys.pseudonym_key),
            hub_ack_key: resolve(&raw.keys.hub_ack_key),
        },
        modbus,
        devices,
        uplink,
        status,
        log,
        mqtt_sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{gateway_config, profile_set, tcp_device, VOLTAGE_PROFILE};

    fn config() -> String {
        gateway_config("grid", "\"voltage_l1\"", &tcp_device("m1", "test-m"))
    }

    fn profiles() -> ProfileSet {
        profile_set(&[("test-m", VOLTAGE_PROFILE)])
    }

    fn parse_str(text: &str) -> Result<GatewayConfig, ConfigError> {
        parse(Path::new("/etc/citygate/gw.toml"), text, Some(profiles()))
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = parse_str(&config()).unwrap();
        assert_eq!(c.gateway_id.as_str(), "gw-1");
        assert_eq!(c.store.path, Path::new("/etc/citygate/store"));
        assert_eq!(c.batch.max_age, Duration::from_secs(1));
        assert_eq!(c.devices.len(), 1);
        assert_eq!(
            c.devices[0].modbus().unwrap().timeout,
            Duration::from_secs(1)
        );
        assert_eq!(c.store.cache_capacity_bytes, 4 * 1024 * 1024);
    }

    fn errors(text: &str) -> Vec<Diagnostic> {
        parse_str(text).unwrap_err().diagnostics
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = errors(&config().replace("unit = 1", "unit = 1\nbaud = 9600"));
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
        let text = config()
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

    /// Issue 9 item 15: a gateway may not plan batches the hub would refuse.
    #[test]
    fn max_records_above_the_hub_ceiling_is_refused() {
        let text = config().replace("[store]", "[batch]\nmax_records = 60000\n\n[store]");
        let e = errors(&text);
        assert_eq!(e[0].key, "batch.max_records", "{e:?}");
        assert!(e[0].message.contains("50000"), "{}", e[0]);
        let ok = config().replace("[store]", "[batch]\nmax_records = 50000\n\n[store]");
        assert!(parse_str(&ok).is_ok());
    }

    #[test]
    fn bad_duration_and_transport_are_explained() {
        let e = errors(&config().replace("poll_interval = \"1s\"", "poll_interval = \"soon\""));
        assert!(e[0].message.contains("e.g."), "{}", e[0]);
        assert_eq!(e[0].key, "device.poll_interval");
        let e = errors(&config().replace("type = \"tcp\"", "type = \"carrier-pigeon\""));
        assert!(e[0].message.contains("tcp"), "{}", e[0]);
        let e = errors(&config().replace("127.0.0.1:502", "127.0.0.1"));
        assert_eq!(e[0].key, "device[0].transport.address");
    }

    /// issue 9 item 6: a quota smaller than the largest batch is refused, located, with the
    /// minimum.
    #[test]
    fn a_store_quota_smaller_than_a_batch_is_refused_with_the_minimum() {
        let with = |max: &str| config().replace("[store]", &format!("[store]\nmax_bytes = {max}"));
        let e = errors(&with("1"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key, "store.max_bytes");
        assert!(e[0].line > 0);
        assert!(e[0].message.contains("at least 524288"), "{}", e[0]);
        let min = parse_str(&with("524288")).unwrap();
        assert_eq!(min.store.max_bytes, super::super::MAX_BATCH_BYTES as u64);
    }

    /// issue 10 item 2: the uplink's reconnect and ack keys default to the low jittered cap
    /// and are validated with file, line and key.
    #[test]
    fn uplink_reconnect_keys_default_low_and_are_located() {
        let uplink = |keys: &str| {
            format!(
                "{}\n[uplink]\nbroker = \"hub:8883\"\ndanger_plaintext = true\n{keys}",
                config()
            )
        };
        let u = parse_str(&uplink("")).unwrap().uplink.unwrap();
        assert_eq!(u.reconnect, crate::backoff::BackoffPolicy::RECONNECT);
        assert_eq!(u.ack_timeout, Duration::from_secs(10));
        let u = parse_str(&uplink(
            "reconnect_initial = \"100ms\"\nreconnect_max = \"3s\"\nack_timeout = \"1h\"\n",
        ))
        .unwrap()
        .uplink
        .unwrap();
        assert_eq!(u.reconnect.initial, Duration::from_millis(100));
        assert_eq!(u.reconnect.max, Duration::from_secs(3));
        assert_eq!(u.ack_timeout, Duration::from_secs(3600));
        let text =
            uplink("reconnect_initial = \"0s\"\nreconnect_max = \"11m\"\nack_timeout = \"10ms\"\n");
        let line_of = |key: &str| text.lines().position(|l| l.starts_with(key)).unwrap() + 1;
        let e = errors(&text);
        let mut found: Vec<(usize, &str)> = e.iter().map(|d| (d.line, d.key.as_str())).collect();
        found.sort();
        assert_eq!(
            found,
            [
                (line_of("reconnect_initial"), "uplink.reconnect_initial"),
                (line_of("reconnect_max"), "uplink.reconnect_max"),
                (line_of("ack_timeout"), "uplink.ack_timeout"),
            ],
            "{e:?}"
        );
        let e = errors(&uplink(
            "reconnect_initial = \"5s\"\nreconnect_max = \"1s\"\n",
        ));
        assert_eq!(e[0].key, "uplink.reconnect_max");
        assert!(e[0].message.contains("reconnect_initial (5s)"), "{}", e[0]);
    }

    #[test]
    fn purpose_field_typos_are_caught() {
        let e = errors(&config().replace("[\"voltage_l1\"]", "[\"voltage_l9\"]"));
        assert_eq!(e[0].key, "purpose.fields");
        assert!(e[0].message.contains("valid: voltage_l1"));
    }

    /// issue 12 item 1: `[log] format` is text by default, json on request, and anything
    /// else is a located error naming the valid values.
    #[test]
    fn log_format_is_validated() {
        use crate::config::log::LogFormat;
        let with = |section: &str| config().replace("[store]", &format!("{section}\n\n[store]"));
        assert_eq!(parse_str(&config()).unwrap().log.format, LogFormat::Text);
        let json = parse_str(&with("[log]\nformat = \"json\"")).unwrap();
        assert_eq!(json.log.format, LogFormat::Json);
        let e = errors(&with("[log]\nformat = \"syslog\""));
        assert_eq!(e[0].key, "log.format");
        assert!(
            e[0].message.contains("valid: \"text\", \"json\""),
            "{}",
            e[0]
        );
        assert!(e[0].line > 1, "{}", e[0]);
    }

    #[test]
    fn status_endpoint_is_loopback_unless_opted_out() {
        let with = |section: &str| config().replace("[store]", &format!("{section}\n\n[store]"));
        let default = parse_str(&config()).unwrap().status.listen;
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
        let serial = config().replace(
            "{ type = \"tcp\", address = \"127.0.0.1:502\" }",
            "{ type = \"serial\", port = \"/dev/ttyUSB0\", baud = 19200, parity = \"even\" }",
        );
        let c = parse_str(&serial).unwrap();
        let line = c.devices[0].modbus().unwrap().transport.line().unwrap();
        assert_eq!(
            (line.baud, line.parity),
            (Some(19200), Some(crate::profile::Parity::Even))
        );
        let dtu = config().replace(
            "{ type = \"tcp\", address = \"127.0.0.1:502\" }",
            "{ type = \"dtu\", id = \"865000111\", listen = \"0.0.0.0:9000\" }",
        );
        assert!(parse_str(&dtu).unwrap().devices[0]
            .modbus()
            .unwrap()
            .transport
            .is_rtu());
        let e = errors(&serial.replace("19200", "9601"));
        assert_eq!(e[0].key, "device[0].transport.baud", "{}", e[0]);
        assert_eq!(e[0].line, 19);
        assert!(e[0].message.contains("valid"), "{}", e[0]);
        let e = errors(&serial.replace("\"even\"", "\"mark\""));
        assert!(e[0].message.contains("even"), "{}", e[0]);
        let e = errors(&serial.replace("baud = 19200", "speed = 19200"));
        assert!(e[0].message.contains("speed"), "{}", e[0]);
        let e = errors(&config().replace(
            "{ type = \"tcp\", address = \"127.0.0.1:502\" }",
            "{ type = \"rtu_tcp\", address = \"10.0.0.5\" }",
        ));
        assert_eq!(e[0].key, "device[0].transport.address");
    }
}

//! `[[mqtt_source]]` broker connections and `transport = { type = "mqtt", … }` devices.
//!
//! ```toml
//! [[mqtt_source]]
//! name = "meters"                  # devices refer to it
//! broker = "broker.lan:8883"
//! client_id = "gw-1-meters"        # default: "<gateway id>-<name>"
//! ca_file = "tls/ca.pem"           # TLS with a client certificate, as the uplink;
//! cert_file = "tls/gw.pem"         # or danger_plaintext = true and none of the three
//! key_file = "tls/gw.key"
//! qos = 1                          # 0 or 1
//! max_clock_skew = "5m"            # meter timestamps further ahead are uncertain(clock_skew)
//! max_clock_lag = "1d"             # … and further behind too (raise for meters uploading late)
//! max_packet_bytes = 16777216      # largest packet read from the broker (see below)
//! down_grace = "60s"               # down (or reconnect-looping) longer: /health degraded
//!
//! [[device]]
//! name = "w-0017"
//! profile = "oem-ultrasonic-water-mqtt"
//! transport = { type = "mqtt", source = "meters", topic = "meters/w-0017/up" }
//! # or one wildcard level that names the device: topic = "meters/+/up", key = "W0017"
//! # (key defaults to the device name); or a ThingsBoard gateway-API topic, where the
//! # key is the device's name in the payload: topic = "v1/gateway/telemetry", key = "Meter A"
//! # expect_every = "15m" in the transport: no usable message for that long = stale
//! ```
//!
//! Messages above the decoder's 64 KiB limit are dropped and counted (`mqtt_oversized`); the
//! connection stays up for any packet up to `max_packet_bytes`. A larger packet breaks the
//! connection (rumqttc reads no further), and a retained one would come back on every
//! reconnect: the source then backs off to the capped delay and raises the fault
//! `mqtt_source:<name>`. Set the broker's own limit (mosquitto `message_size_limit`) below
//! `max_packet_bytes` so such messages never reach the gateway.
//!
//! A topic is a concrete topic name, or a filter with exactly one `+` level whose value
//! selects the device by `key`; `#` is not allowed (a device is one topic). A `key` on a
//! concrete topic names the device inside ThingsBoard gateway-API messages
//! (`{"Meter A": [{"ts": …, "values": {…}}]}`); such devices need a `thingsboard` profile. Two devices
//! may not share a (source, topic, key) route, and an MQTT device needs an MQTT profile
//! (and a register device a register profile).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::duration::HumanDuration;
use super::{MqttTopic, TlsFiles};
use crate::profile::mqtt::PayloadShape;
use crate::profile::Profile;

/// One broker connection that MQTT meters publish to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSourceConfig {
    pub name: String,
    /// `host:port`; the host is the name the broker's certificate must carry.
    pub broker: String,
    pub client_id: String,
    /// `None` only with `danger_plaintext`.
    pub tls: Option<TlsFiles>,
    /// Subscription QoS: 0 or 1.
    pub qos: u8,
    /// How far ahead of the gateway's clock a meter's timestamp may be before its values
    /// are `uncertain(clock_skew)` and no longer advance the per-field staleness gate.
    pub max_clock_skew: Duration,
    /// How far behind the gateway's clock a meter's timestamp may be before its values
    /// are `uncertain(clock_skew)` (kept as sent). Meters that upload buffered readings
    /// need at least their upload interval.
    pub max_clock_lag: Duration,
    /// Largest packet read from the broker; a larger one breaks the connection.
    pub max_packet_bytes: usize,
    /// How long the source may be disconnected, or a connection must stay up to end a
    /// reconnect loop, before `/health` is degraded and its devices are stale.
    pub down_grace: Duration,
}

/// Default `max_clock_skew`.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Default `max_clock_lag`: one day, so a meter uploading once a day is not flagged, while
/// a clock left unset or a year off is.
pub const DEFAULT_MAX_CLOCK_LAG: Duration = Duration::from_secs(24 * 3600);
/// Default `max_packet_bytes`: far above any meter message, so an oversized one is read,
/// counted and dropped instead of breaking the connection.
pub const DEFAULT_SOURCE_MAX_PACKET_BYTES: usize = 16 << 20;
/// Bounds of `max_packet_bytes`: room for a message at the decoder's limit plus its topic;
/// MQTT's own maximum.
const SOURCE_PACKET_BYTES: std::ops::RangeInclusive<usize> = (128 << 10)..=268_435_455;
/// Default `down_grace`.
pub const DEFAULT_DOWN_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqttSource {
    name: Spanned<String>,
    broker: Spanned<String>,
    client_id: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    danger_plaintext: bool,
    qos: Option<Spanned<u8>>,
    max_clock_skew: Option<HumanDuration>,
    max_clock_lag: Option<HumanDuration>,
    max_packet_bytes: Option<Spanned<usize>>,
    down_grace: Option<Spanned<HumanDuration>>,
}

/// A located problem: the span, the key below the section, the message.
pub(super) type Problem = (std::ops::Range<usize>, String, String);

/// Converts the `[[mqtt_source]]` tables; problems are returned with their spans.
pub(super) fn sources(
    raw: Vec<RawMqttSource>,
    gateway_id: &str,
    resolve: &dyn Fn(&Path) -> PathBuf,
    problems: &mut Vec<Problem>,
) -> Vec<MqttSourceConfig> {
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        let key = format!("mqtt_source[{i}]");
        let name = s.name.get_ref().clone();
        if name.is_empty() || !names.insert(name.clone()) {
            problems.push((
                s.name.span(),
                format!("{key}.name"),
                format!("source name {name:?} is empty or used twice"),
            ));
        }
        if !super::is_host_port(s.broker.get_ref()) {
            problems.push((
                s.broker.span(),
                format!("{key}.broker"),
                format!(
                    "{:?} is not host:port, e.g. \"broker.lan:8883\"",
                    s.broker.get_ref()
                ),
            ));
        }
        let qos = s.qos.as_ref().map_or(1, |q| *q.get_ref());
        if qos > 1 {
            let span = s.qos.as_ref().map_or(s.name.span(), Spanned::span);
            problems.push((span, format!("{key}.qos"), "valid: 0 or 1".into()));
        }
        let max_packet_bytes = match &s.max_packet_bytes {
            Some(m) if !SOURCE_PACKET_BYTES.contains(m.get_ref()) => {
                problems.push((
                    m.span(),
                    format!("{key}.max_packet_bytes"),
                    format!(
                        "valid: {} to {} bytes",
                        SOURCE_PACKET_BYTES.start(),
                        SOURCE_PACKET_BYTES.end()
                    ),
                ));
                DEFAULT_SOURCE_MAX_PACKET_BYTES
            }
            Some(m) => *m.get_ref(),
            None => DEFAULT_SOURCE_MAX_PACKET_BYTES,
        };
        let down_grace = match &s.down_grace {
            Some(g) if g.get_ref().0 < Duration::from_secs(1) => {
                problems.push((
                    g.span(),
                    format!("{key}.down_grace"),
                    "valid: at least 1s, e.g. \"60s\"".into(),
                ));
                DEFAULT_DOWN_GRACE
            }
            Some(g) => g.get_ref().0,
            None => DEFAULT_DOWN_GRACE,
        };
        let tls = match super::tls_files(
            s.ca_file,
            s.cert_file,
            s.key_file,
            s.danger_plaintext,
            resolve,
        ) {
            Ok(tls) => tls,
            // Kept (the config is rejected anyway) so its devices are not reported too.
            Err(msg) => {
                problems.push((s.broker.span(), key, msg));
                None
            }
        };
        out.push(MqttSourceConfig {
            client_id: s
                .client_id
                .unwrap_or_else(|| format!("{gateway_id}-{name}")),
            name,
            broker: s.broker.into_inner(),
            tls,
            qos,
            max_clock_skew: s.max_clock_skew.map_or(DEFAULT_MAX_CLOCK_SKEW, |d| d.0),
            max_clock_lag: s.max_clock_lag.map_or(DEFAULT_MAX_CLOCK_LAG, |d| d.0),
            max_packet_bytes,
            down_grace,
        });
    }
    out
}

/// Checks device routes as devices are read.
#[derive(Debug)]
pub(super) struct DeviceRoutes {
    sources: Vec<String>,
    seen: HashSet<(String, String, Option<String>)>,
}

impl DeviceRoutes {
    pub(super) fn new(sources: &[MqttSourceConfig]) -> Self {
        Self {
            sources: sources.iter().map(|s| s.name.clone()).collect(),
            seen: HashSet::new(),
        }
    }

    /// The transport of an MQTT device, or why it is not valid.
    pub(super) fn topic(
        &mut self,
        device: &str,
        source: String,
        topic: String,
        key: Option<String>,
    ) -> Result<MqttTopic, String> {
        if !self.sources.contains(&source) {
            return Err(format!(
                "no [[mqtt_source]] named {source:?}; valid: {}",
                if self.sources.is_empty() {
                    "(none configured)".to_string()
                } else {
                    self.sources.join(", ")
                }
            ));
        }
        let wildcard = check_topic(&topic)?;
        let key = match (wildcard, key) {
            (true, key) => Some(key.unwrap_or_else(|| device.to_string())),
            (false, key) => key,
        };
        // A concrete topic is either one device's or a gateway-API topic shared by keys.
        let mixed = !wildcard
            && self
                .seen
                .iter()
                .any(|(s, t, k)| s == &source && t == &topic && k.is_some() != key.is_some());
        if mixed {
            return Err(format!(
                "{topic:?} is used with and without `key`; a concrete topic is one device's, \
                 or a ThingsBoard gateway-API topic where every device has a `key`"
            ));
        }
        if !self
            .seen
            .insert((source.clone(), topic.clone(), key.clone()))
        {
            return Err(format!(
                "another device already listens on {topic:?} of source {source:?}{}",
                key.as_deref()
                    .map(|k| format!(" with key {k:?}"))
                    .unwrap_or_default()
            ));
        }
        Ok(MqttTopic {
            source,
            topic,
            key,
            expect_every: None,
        })
    }
}

/// Validates a device topic; true if it has a `+` level.
pub(crate) fn check_topic(topic: &str) -> Result<bool, String> {
    let help = "valid: a topic such as \"meters/w-0017/up\", or one with exactly one `+` level \
                such as \"meters/+/up\" (no `#`)";
    if topic.is_empty() || topic.len() > 1024 || topic.contains(['#', '\0']) {
        return Err(format!("topic {topic:?} is not valid; {help}"));
    }
    let pluses = topic.split('/').filter(|l| l.contains('+')).count();
    if topic.split('/').any(|l| l.contains('+') && l != "+") || pluses > 1 {
        return Err(format!("topic {topic:?} is not valid; {help}"));
    }
    Ok(pluses == 1)
}

/// Whether a device's profile fits its transport.
pub(super) fn profile_fits(mqtt: Option<&MqttTopic>, profile: &Profile) -> Result<(), String> {
    match (mqtt, &profile.mqtt) {
        (Some(_), None) => Err(format!(
            "profile {:?} describes registers; an MQTT device needs a profile with protocol = \"mqtt\"",
            profile.name
        )),
        (
            Some(MqttTopic {
                topic, key: Some(_), ..
            }),
            Some(spec),
        ) if !topic.contains('+') && spec.shape != PayloadShape::ThingsBoard => Err(format!(
            "a `key` on a topic without `+` selects a device in ThingsBoard gateway-API \
             messages, but profile {:?} has shape {:?}; valid: a \"thingsboard\" profile, \
             or a topic with one `+` level",
            profile.name,
            spec.shape.as_str()
        )),
        (Some(_), Some(_)) => Ok(()),
        (None, Some(_)) => Err(format!(
            "profile {:?} describes MQTT payloads; use transport = {{ type = \"mqtt\", … }}",
            profile.name
        )),
        (None, None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::{check_topic, DEFAULT_MAX_CLOCK_SKEW};
    use crate::config::{DeviceKind, Diagnostic, GatewayConfig, MqttTopic};
    use crate::profile::{Profile, ProfileSet};
    use crate::test_fixtures::{gateway_config, VOLTAGE_PROFILE};

    const MQTT_PROFILE: &str = r#"
[meter]
vendor = "T"
model = "W"
protocol = "mqtt"
[mqtt]
shape = "json"
[[field]]
name = "flow_rate"
pointer = "/flow"
unit = "m3/h"
category = "measurement"
grade = "L2"
"#;

    /// Source `meters` and two water meters on it.
    const SOURCE_AND_DEVICES: &str = r#"[[mqtt_source]]
name = "meters"
broker = "broker.lan:8883"
ca_file = "tls/ca.pem"
cert_file = "tls/gw.pem"
key_file = "tls/gw.key"

[[device]]
name = "w1"
profile = "test-w"
transport = { type = "mqtt", source = "meters", topic = "water/w1/up" }

[[device]]
name = "w2"
profile = "test-w"
transport = { type = "mqtt", source = "meters", topic = "water/+/up" }
"#;

    fn config() -> String {
        gateway_config("water", "\"flow_rate\"", SOURCE_AND_DEVICES)
    }

    fn parse(text: &str) -> Result<GatewayConfig, Vec<Diagnostic>> {
        let mut set = ProfileSet::default();
        set.insert(Profile::parse(Path::new("test-w.toml"), MQTT_PROFILE).unwrap());
        set.insert(Profile::parse(Path::new("test-m.toml"), VOLTAGE_PROFILE).unwrap());
        GatewayConfig::parse(Path::new("/etc/citygate/gw.toml"), text, Some(set))
            .map_err(|e| e.diagnostics)
    }

    #[test]
    fn mqtt_sources_and_devices_load_with_defaults() {
        let c = parse(&config()).unwrap();
        let s = &c.mqtt_sources[0];
        assert_eq!(s.client_id, "gw-1-meters");
        assert_eq!(s.qos, 1);
        assert_eq!(s.max_clock_skew, DEFAULT_MAX_CLOCK_SKEW);
        assert_eq!(s.max_clock_lag, super::DEFAULT_MAX_CLOCK_LAG);
        let tight = config().replace(
            "key_file = \"tls/gw.key\"",
            "key_file = \"tls/gw.key\"\nmax_clock_skew = \"30s\"\nmax_clock_lag = \"2h\"",
        );
        let tight = &parse(&tight).unwrap().mqtt_sources[0];
        assert_eq!(tight.max_clock_skew, std::time::Duration::from_secs(30));
        assert_eq!(tight.max_clock_lag, std::time::Duration::from_secs(7200));
        assert_eq!(s.max_packet_bytes, super::DEFAULT_SOURCE_MAX_PACKET_BYTES);
        assert_eq!(s.down_grace, super::DEFAULT_DOWN_GRACE);
        assert_eq!(
            s.tls.as_ref().unwrap().ca_file,
            Path::new("/etc/citygate/tls/ca.pem")
        );
        assert_eq!(
            c.devices[1].kind,
            DeviceKind::Mqtt(MqttTopic {
                source: "meters".into(),
                topic: "water/+/up".into(),
                key: Some("w2".into()),
                expect_every: None,
            }),
            "the key defaults to the device name"
        );
        assert!(c.devices[0].modbus().is_none());
    }

    #[test]
    fn plaintext_needs_saying_so() {
        let text = config().replace("ca_file = \"tls/ca.pem\"\n", "");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key, "mqtt_source[0]");
        assert!(e[0].message.contains("missing: ca_file"), "{}", e[0]);
        let text = config()
            .replace("ca_file = \"tls/ca.pem\"\n", "")
            .replace("cert_file = \"tls/gw.pem\"\n", "")
            .replace("key_file = \"tls/gw.key\"\n", "danger_plaintext = true\n");
        assert!(parse(&text).unwrap().mqtt_sources[0].tls.is_none());
    }

    #[test]
    fn bad_routes_are_located() {
        let cases = [
            ("source = \"meters\", topic = \"water/w1/up\"", "source = \"nope\", topic = \"water/w1/up\"", "valid: meters"),
            ("topic = \"water/w1/up\"", "topic = \"water/#\"", "no `#`"),
            ("topic = \"water/+/up\" }", "topic = \"water/w1/up\", key = \"w2\" }", "with and without `key`"),
            ("topic = \"water/+/up\" }", "topic = \"water/+/up\", key = \"w1\" }\n[[device]]\nname = \"w3\"\nprofile = \"test-w\"\ntransport = { type = \"mqtt\", source = \"meters\", topic = \"water/+/up\", key = \"w1\" }", "already listens"),
        ];
        for (from, to, want) in cases {
            let e = parse(&config().replacen(from, to, 1)).unwrap_err();
            assert!(
                e.iter()
                    .any(|d| d.key.ends_with(".transport") && d.message.contains(want)),
                "{to}: {e:?}"
            );
        }
        let e = parse(&config().replace("broker.lan:8883", "broker.lan")).unwrap_err();
        assert_eq!(
            (e[0].key.as_str(), e[0].line),
            ("mqtt_source[0].broker", 18)
        );
    }

    #[test]
    fn profiles_must_fit_the_transport() {
        let e = parse(&config().replacen("profile = \"test-w\"", "profile = \"test-m\"", 1))
            .unwrap_err();
        assert!(
            e.iter()
                .any(|d| d.key == "device[0].profile" && d.message.contains("protocol = \"mqtt\"")),
            "{e:?}"
        );
        let modbus = "[[device]]\nname = \"m1\"\nprofile = \"test-w\"\ntransport = { type = \"tcp\", address = \"10.0.0.1:502\" }\nunit = 1\npoll_interval = \"1s\"\n";
        let e = parse(&format!("{}{modbus}", config())).unwrap_err();
        assert!(
            e.iter()
                .any(|d| d.key == "device[2].profile" && d.message.contains("type = \"mqtt\"")),
            "{e:?}"
        );
        let e = parse(&config().replacen(
            "topic = \"water/w1/up\" }",
            "topic = \"water/w1/up\" }\nunit = 3\npoll_interval = \"1s\"",
            1,
        ))
        .unwrap_err();
        let keys: Vec<&str> = e.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["device[0].unit", "device[0].poll_interval"], "{e:?}");
        let gw = "[[device]]\nname = \"g1\"\nprofile = \"test-w\"\ntransport = { type = \"mqtt\", source = \"meters\", topic = \"v1/gateway/telemetry\", key = \"Meter A\" }\n";
        let e = parse(&format!("{}{gw}", config())).unwrap_err();
        assert!(
            e.iter()
                .any(|d| d.key == "device[2].profile" && d.message.contains("gateway-API")),
            "{e:?}"
        );
        let no_unit = modbus
            .replace("profile = \"test-w\"", "profile = \"test-m\"")
            .replace("unit = 1\n", "");
        let e = parse(&format!("{}{no_unit}", config())).unwrap_err();
        assert!(e.iter().any(|d| d.key == "device[2].unit"), "{e:?}");
    }

    #[test]
    fn packet_limit_down_grace_and_expect_every_are_checked() {
        let with = |extra: &str, transport_extra: &str| {
            parse(
                &config()
                    .replace(
                        "key_file = \"tls/gw.key\"",
                        &format!("key_file = \"tls/gw.key\"\n{extra}"),
                    )
                    .replace(
                        "topic = \"water/w1/up\" }",
                        &format!("topic = \"water/w1/up\"{transport_extra} }}"),
                    ),
            )
        };
        let c = with(
            "max_packet_bytes = 131072\ndown_grace = \"5s\"",
            ", expect_every = \"15m\"",
        )
        .unwrap();
        assert_eq!(c.mqtt_sources[0].max_packet_bytes, 131_072);
        assert_eq!(c.mqtt_sources[0].down_grace, Duration::from_secs(5));
        assert_eq!(
            c.devices[0].mqtt().unwrap().expect_every,
            Some(Duration::from_secs(900))
        );
        assert_eq!(c.devices[1].mqtt().unwrap().expect_every, None);
        let e = with(
            "max_packet_bytes = 1000\ndown_grace = \"10ms\"",
            ", expect_every = \"0s\"",
        )
        .unwrap_err();
        let keys: Vec<&str> = e.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "device[0].transport.expect_every",
                "mqtt_source[0].max_packet_bytes",
                "mqtt_source[0].down_grace",
            ],
            "{e:?}"
        );
        assert!(e[1].message.contains("131072"), "{}", e[1]);
    }

    #[test]
    fn topics() {
        assert_eq!(check_topic("meters/w-1/up"), Ok(false));
        assert_eq!(check_topic("/sys/pk/+/thing/event/property/post"), Ok(true));
        for bad in ["", "a/#", "a/+/+", "a/b+/c", "+x"] {
            assert!(check_topic(bad).is_err(), "{bad}");
        }
    }
}

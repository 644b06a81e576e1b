//! The `[[device]]` entries of the gateway config: schema, transports, schedule and
//! transformer ratios, validated into [`DeviceConfig`]s with located diagnostics.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::duration::HumanDuration;
use super::mqtt::DeviceRoutes;
use super::{
    DeviceConfig, DeviceKind, ModbusConfig, ModbusDevice, MqttTopic, Transport,
    MAX_DTU_REGISTRATION,
};
use crate::diag::{Diagnostic, SourceFile};
use crate::profile::{Profile, ProfileSet, Ratio, Ratios};
use crate::reading::{AreaId, DeviceId, UnitId};

const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What device validation needs from the rest of the config.
#[derive(Debug)]
pub(super) struct Context<'a> {
    pub src: &'a SourceFile<'a>,
    pub profiles: &'a ProfileSet,
    pub profiles_dir: &'a Path,
    /// False when the profiles directory failed to load (then unknown profile names are
    /// not reported again).
    pub profiles_loaded: bool,
    pub modbus: &'a ModbusConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    name: Spanned<String>,
    profile: Spanned<String>,
    transport: Spanned<RawTransport>,
    /// Required for Modbus transports; MQTT devices have none.
    unit: Option<Spanned<u8>>,
    poll_interval: Option<Spanned<HumanDuration>>,
    timeout: Option<HumanDuration>,
    location: Option<String>,
    /// The area (feeder, district, building) the device belongs to, for area aggregates.
    area: Option<Spanned<String>>,
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
        /// Networks DTUs may connect from, e.g. `["10.0.0.0/8"]`; unset: any.
        allow: Option<Vec<String>>,
        baud: Option<u32>,
        parity: Option<crate::profile::Parity>,
        data_bits: Option<u8>,
        stop_bits: Option<u8>,
    },
    Mqtt {
        source: String,
        topic: String,
        key: Option<String>,
        /// No usable message for this long: the device is stale.
        expect_every: Option<HumanDuration>,
    },
}

/// Serial settings of an RTU transport; unset keys come from the profile's `[line]`.
fn line_override(
    baud: Option<u32>,
    parity: Option<crate::profile::Parity>,
    data_bits: Option<u8>,
    stop_bits: Option<u8>,
) -> crate::profile::line::LineOverride {
    crate::profile::line::LineOverride {
        baud,
        data_bits,
        parity,
        stop_bits,
    }
}

/// The bus a transport reaches: one Modbus TCP endpoint, serial port, serial server or DTU.
fn bus_key(t: &Transport) -> String {
    match t {
        Transport::Tcp { address } => format!("tcp {address}"),
        Transport::Serial { port, .. } => format!("serial {port}"),
        Transport::RtuTcp { address, .. } => format!("rtu_tcp {address}"),
        Transport::Dtu { id, .. } => format!("dtu {id}"),
    }
}

/// A device already configured whose RTU transport names the same port, server or
/// DTU id as `t` with different settings.
fn rtu_conflict(devices: &[DeviceConfig], t: &Transport) -> Option<DeviceId> {
    if matches!(t, Transport::Tcp { .. }) {
        return None;
    }
    let k = bus_key(t);
    devices
        .iter()
        .filter_map(|d| Some((d, &d.modbus()?.transport)))
        .find(|(_, other)| bus_key(other) == k && *other != t)
        .map(|(d, _)| d.id.clone())
}

/// A device already configured whose DTU transport listens on the same address as `t`
/// with a different `allow` list (one listener, one list: it applies before the id is read).
fn allow_conflict(devices: &[DeviceConfig], t: &Transport) -> Option<DeviceId> {
    let Transport::Dtu { listen, allow, .. } = t else {
        return None;
    };
    devices
        .iter()
        .find(|d| {
            d.modbus().is_some_and(|m| {
                matches!(&m.transport, Transport::Dtu { listen: l, allow: a, .. } if l == listen && a != allow)
            })
        })
        .map(|d| d.id.clone())
}

/// A device already configured on the same bus as `t` with the same unit id: both would
/// read the same meter, and its readings would leave the box twice under two names.
fn unit_taken(devices: &[DeviceConfig], t: &Transport, unit: UnitId) -> Option<DeviceId> {
    let k = bus_key(t);
    devices
        .iter()
        .find(|d| {
            d.modbus()
                .is_some_and(|m| m.unit == unit && bus_key(&m.transport) == k)
        })
        .map(|d| d.id.clone())
}

/// Validates every `[[device]]`, reporting each problem into `errors`; devices with a
/// problem that leaves no usable value (name, profile) are left out.
pub(super) fn devices(
    raw: Vec<RawDevice>,
    cx: &Context<'_>,
    mqtt_routes: &mut DeviceRoutes,
    errors: &mut Vec<Diagnostic>,
) -> Vec<DeviceConfig> {
    let (src, profiles) = (cx.src, cx.profiles);
    let mut names = HashSet::new();
    let mut devices = Vec::with_capacity(raw.len());
    for (i, d) in raw.into_iter().enumerate() {
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
        if profile.is_none() && cx.profiles_loaded {
            let valid: Vec<&str> = profiles.names().collect();
            errors.push(src.at(
                d.profile.span(),
                format!("{key}.profile"),
                format!(
                    "no profile named {:?} in {}; valid: {}",
                    d.profile.get_ref(),
                    cx.profiles_dir.display(),
                    valid.join(", ")
                ),
            ));
        }
        let (unit, interval) = schedule(&d, &key, src, errors);
        let transport_span = d.transport.span();
        let transport = transport(
            d.transport.into_inner(),
            &transport_span,
            &key,
            d.name.get_ref(),
            src,
            mqtt_routes,
            errors,
        );
        let ratios = device_ratios(
            src,
            &key,
            errors,
            (d.ct_ratio.as_ref(), d.pt_ratio.as_ref()),
            profile.as_deref(),
        );
        if let Via::Modbus(transport) = &transport {
            if let Some(line) = transport.line() {
                for (k, msg) in line.problems() {
                    errors.push(src.at(
                        transport_span.clone(),
                        format!("{key}.transport.{k}"),
                        msg,
                    ));
                }
            }
            if let Some(other) = unit_taken(&devices, transport, UnitId(unit)) {
                let span = d.unit.as_ref().map_or(transport_span.clone(), |u| u.span());
                errors.push(src.at(
                    span,
                    format!("{key}.unit"),
                    format!("device `{other}` already polls unit {unit} on this bus ({}); give each meter its own unit id", bus_key(transport)),
                ));
            }
            if let Some(other) = rtu_conflict(&devices, transport) {
                errors.push(src.at(
                    transport_span.clone(),
                    format!("{key}.transport"),
                    format!("conflicts with device `{other}` on the same port or DTU: one bus needs one set of line settings (and a DTU id one listen address)"),
                ));
            } else if let Some(other) = allow_conflict(&devices, transport) {
                errors.push(src.at(
                    transport_span.clone(),
                    format!("{key}.transport.allow"),
                    format!("device `{other}` has a DTU on the same listen address with a different allow list; give every DTU of one listener the same list"),
                ));
            }
        }
        let mqtt = match &transport {
            Via::Mqtt(t) => Some(t),
            Via::Modbus(_) => None,
        };
        if let Some(Err(m)) = profile.as_ref().map(|p| super::mqtt::profile_fits(mqtt, p)) {
            errors.push(src.at(d.profile.span(), format!("{key}.profile"), m));
        }
        let area = d.area.and_then(|a| match AreaId::new(a.get_ref().clone()) {
            Ok(area) => Some(area),
            Err(e) => {
                errors.push(src.at(a.span(), format!("{key}.area"), e.to_string()));
                None
            }
        });
        if let (Some(id), Some(profile)) = (id, profile) {
            let kind = match transport {
                Via::Modbus(transport) => DeviceKind::Modbus(ModbusDevice {
                    transport,
                    unit: UnitId(unit),
                    poll_interval: interval,
                    timeout: d.timeout.map_or(cx.modbus.timeout, |t| t.0),
                }),
                Via::Mqtt(topic) => DeviceKind::Mqtt(topic),
            };
            devices.push(DeviceConfig {
                id,
                profile,
                kind,
                location: d.location,
                area,
                ratios,
            });
        }
    }
    devices
}

/// The unit id and poll interval: required for polled (Modbus) devices, refused for
/// MQTT meters, which publish on their own schedule.
fn schedule(
    d: &RawDevice,
    key: &str,
    src: &SourceFile<'_>,
    errors: &mut Vec<Diagnostic>,
) -> (u8, Duration) {
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
    (unit, interval)
}

/// A validated transport: a Modbus one, or an MQTT topic.
enum Via {
    Modbus(Transport),
    Mqtt(MqttTopic),
}

/// The transport as written → validated; problems are reported at `span`.
fn transport(
    raw: RawTransport,
    span: &std::ops::Range<usize>,
    key: &str,
    name: &str,
    src: &SourceFile<'_>,
    mqtt_routes: &mut DeviceRoutes,
    errors: &mut Vec<Diagnostic>,
) -> Via {
    let modbus = match raw {
        RawTransport::Tcp { address } => {
            if !super::is_host_port(&address) {
                errors.push(src.at(
                    span.clone(),
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
                    span.clone(),
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
                    span.clone(),
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
            allow,
            baud,
            parity,
            data_bits,
            stop_bits,
        } => {
            if id.trim().is_empty() || id.len() > MAX_DTU_REGISTRATION {
                errors.push(src.at(
                    span.clone(),
                    format!("{key}.transport.id"),
                    "must be the DTU's registration identifier (1..=128 bytes), e.g. its IMEI",
                ));
            }
            if !super::is_host_port(&listen) {
                errors.push(src.at(
                    span.clone(),
                    format!("{key}.transport.listen"),
                    format!("{listen:?} is not host:port, e.g. \"0.0.0.0:9000\""),
                ));
            }
            if allow.as_ref().is_some_and(Vec::is_empty) {
                errors.push(src.at(
                    span.clone(),
                    format!("{key}.transport.allow"),
                    "an empty list would refuse every DTU; remove the key to accept any peer, or list networks, e.g. [\"10.0.0.0/8\"]",
                ));
            }
            let mut nets = Vec::new();
            for (j, net) in allow.unwrap_or_default().iter().enumerate() {
                match net.parse() {
                    Ok(n) => nets.push(n),
                    Err(m) => {
                        errors.push(src.at(span.clone(), format!("{key}.transport.allow[{j}]"), m))
                    }
                }
            }
            Transport::Dtu {
                id,
                listen,
                heartbeat,
                line: line_override(baud, parity, data_bits, stop_bits),
                allow: nets,
            }
        }
        RawTransport::Mqtt {
            source,
            topic,
            key: k,
            expect_every,
        } => {
            let expect_every = expect_every.map(|d| d.0);
            if expect_every.is_some_and(|d| d < Duration::from_secs(1)) {
                errors.push(src.at(
                    span.clone(),
                    format!("{key}.transport.expect_every"),
                    "valid: at least 1s, e.g. \"15m\"",
                ));
            }
            let topic = mqtt_routes
                .topic(name, source, topic.clone(), k)
                .unwrap_or_else(|m| {
                    errors.push(src.at(span.clone(), format!("{key}.transport"), m));
                    MqttTopic {
                        source: String::new(),
                        topic,
                        key: None,
                        expect_every: None,
                    }
                });
            return Via::Mqtt(MqttTopic {
                expect_every,
                ..topic
            });
        }
    };
    Via::Modbus(modbus)
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
    use super::super::raw::parse;
    use super::*;
    use crate::config::{ConfigError, GatewayConfig};
    use crate::test_fixtures::{gateway_config, profile_set, tcp_device};

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

    fn config() -> String {
        gateway_config("grid", "\"voltage_l1\"", &tcp_device("m1", "test-r"))
    }

    /// test-r (fields with ratios) and test-m (none).
    fn ratio_profiles() -> ProfileSet {
        let plain = RATIO_PROFILE
            .replace("ratio = \"pt\"\n", "")
            .replace("ratio = \"ct_pt\"\n", "");
        profile_set(&[("test-r", RATIO_PROFILE), ("test-m", &plain)])
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
        let text = config().replace(
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
            parse_ratio(&config()).unwrap().devices[0].ratios,
            Ratios::UNITY
        );
        assert_eq!(c.batch.alarm_state_every, Duration::from_secs(15 * 60));
    }

    #[test]
    fn bad_ratios_are_located() {
        let base = config();
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
        let text = config()
            .replace("profile = \"test-r\"", "profile = \"test-m\"")
            .replace(
                "poll_interval = \"1s\"",
                "poll_interval = \"1s\"\nct_ratio = 40",
            );
        let e = parse_ratio(&text).unwrap_err().diagnostics;
        assert_eq!(e[0].key, "device[0].ct_ratio");
        assert!(e[0].message.contains("no field with ratio"), "{}", e[0]);
    }

    /// Issue 9 item 10: a DTU listener's `allow` list is parsed and located.
    #[test]
    fn dtu_allow_lists_are_parsed_and_located() {
        let dtu = |name: &str, id: &str, allow: &str| {
            tcp_device(name, "test-r").replace(
                "{ type = \"tcp\", address = \"127.0.0.1:502\" }",
                &format!("{{ type = \"dtu\", id = \"{id}\", listen = \"0.0.0.0:9000\"{allow} }}"),
            )
        };
        let good = format!(
            "{}\n{}",
            config(),
            dtu(
                "d1",
                "8650001",
                ", allow = [\"10.0.0.0/8\", \"192.168.1.7\"]"
            )
        );
        let c = parse_ratio(&good).unwrap();
        let Transport::Dtu { allow, .. } = &c.devices[1].modbus().unwrap().transport else {
            panic!("not a dtu");
        };
        let shown: Vec<String> = allow.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.168.1.7/32"]);

        let cases = [
            (
                ", allow = [\"10.0.0.0/8\", \"10.0.0.1/8\"]",
                "device[1].transport.allow[1]",
                "host bits",
            ),
            (
                ", allow = [\"ten\"]",
                "device[1].transport.allow[0]",
                "not an IP network",
            ),
            (", allow = []", "device[1].transport.allow", "empty list"),
        ];
        for (allow, key, msg) in cases {
            let text = format!("{}\n{}", config(), dtu("d1", "8650001", allow));
            let e = parse_ratio(&text).unwrap_err().diagnostics;
            assert_eq!(e.len(), 1, "{allow}: {e:?}");
            assert_eq!((e[0].key.as_str(), e[0].line), (key, 26), "{}", e[0]);
            assert!(e[0].message.contains(msg), "{}", e[0]);
        }
        // Two DTUs on one listener with different lists.
        let text = format!(
            "{}\n{}\n{}",
            config(),
            dtu("d1", "8650001", ", allow = [\"10.0.0.0/8\"]"),
            dtu("d2", "8650002", "")
        );
        let e = parse_ratio(&text).unwrap_err().diagnostics;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key, "device[2].transport.allow", "{}", e[0]);
        assert!(e[0].message.contains("`d1`"), "{}", e[0]);
    }

    #[test]
    fn two_devices_polling_the_same_unit_on_one_bus_are_refused() {
        let twice = format!("{}\n{}", config(), tcp_device("m2", "test-r"));
        let e = parse_ratio(&twice).unwrap_err().diagnostics;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key, "device[1].unit", "{}", e[0]);
        assert_eq!(e[0].line, 27, "{}", e[0]);
        assert!(
            e[0].message.contains("device `m1` already polls unit 1"),
            "{}",
            e[0]
        );
        // Another unit on the same endpoint, or the same unit on another endpoint, is fine.
        let other_unit = {
            let at = twice.rfind("unit = 1").unwrap();
            format!(
                "{}unit = 2{}",
                &twice[..at],
                &twice[at + "unit = 1".len()..]
            )
        };
        assert!(parse_ratio(&other_unit).is_ok());
        let other_endpoint = {
            let at = twice.rfind("127.0.0.1:502").unwrap();
            format!(
                "{}127.0.0.1:503{}",
                &twice[..at],
                &twice[at + "127.0.0.1:502".len()..]
            )
        };
        assert!(parse_ratio(&other_endpoint).is_ok());
    }
}

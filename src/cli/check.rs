//! `citygate check`: validate a config and its profiles and show, per device and
//! field, what will be polled and what leaves the box for the declared purpose.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{DeviceKind, GatewayConfig};
use crate::seal::keys;
use crate::source::modbus::plan;

/// A key file's state as `check` reports it.
#[derive(Debug)]
pub(crate) enum KeyStatus {
    Ok,
    Missing,
    Invalid(String),
}

pub(super) fn key_status<T>(
    path: &Path,
    load: impl Fn(&Path) -> Result<T, keys::KeyError>,
) -> KeyStatus {
    if !path.exists() {
        return KeyStatus::Missing;
    }
    match load(path) {
        Ok(_) => KeyStatus::Ok,
        Err(e) => KeyStatus::Invalid(e.to_string()),
    }
}

/// The report, and whether any key file is present but unusable (an error).
pub(crate) fn report(cfg: &GatewayConfig) -> (String, bool) {
    let mut out = String::new();
    let mut key_error = false;
    let _ = writeln!(out, "config    {}", cfg.path.display());
    let _ = writeln!(out, "gateway   {}", cfg.gateway_id);
    let _ = writeln!(
        out,
        "profiles  {} ({} loaded)",
        cfg.profiles_dir.display(),
        cfg.profiles.len()
    );
    let _ = writeln!(
        out,
        "store     {} (quota {} bytes, cache {} bytes)",
        cfg.store.path.display(),
        cfg.store.max_bytes,
        cfg.store.cache_capacity_bytes
    );
    let _ = writeln!(
        out,
        "batches   close at {} records or {:?}",
        cfg.batch.max_records, cfg.batch.max_age
    );
    let statuses = [
        (
            "signing_key",
            &cfg.keys.signing_key,
            key_status(&cfg.keys.signing_key, |p| {
                keys::load_signing_key(p).map(|_| ())
            }),
        ),
        (
            "hub_public_key",
            &cfg.keys.hub_public_key,
            key_status(&cfg.keys.hub_public_key, |p| {
                keys::load_hub_public_key(p).map(|_| ())
            }),
        ),
        (
            "pseudonym_key",
            &cfg.keys.pseudonym_key,
            key_status(&cfg.keys.pseudonym_key, |p| {
                keys::load_pseudonym_key(p).map(|_| ())
            }),
        ),
        (
            "hub_ack_key",
            &cfg.keys.hub_ack_key,
            key_status(&cfg.keys.hub_ack_key, |p| {
                keys::load_hub_ack_verifying_key(p).map(|_| ())
            }),
        ),
    ];
    for (name, path, status) in &statuses {
        let s = match status {
            KeyStatus::Ok => "ok".to_string(),
            KeyStatus::Missing if name.starts_with("hub_") => "missing (import the hub's public \
                 keys: `citygate keys import --from hub.pub --dir DIR`, hub.pub from `citygate keys \
                 export` on the hub; `run` needs it)"
                .to_string(),
            KeyStatus::Missing => {
                "missing (create with `citygate keys gen --role gateway --dir DIR`; `run` needs it)"
                    .to_string()
            }
            KeyStatus::Invalid(e) => {
                key_error = true;
                format!("ERROR: {e}")
            }
        };
        let _ = writeln!(out, "key       {name} {}: {s}", path.display());
    }
    // What the hub must approve: one stamp per purpose flow (no key is involved).
    let stamped = crate::supervisor::stamped_flows(cfg);
    for (flow, stamp) in &stamped {
        let stream = flow.stream;
        let m = flow.policy.meta();
        let _ = writeln!(
            out,
            "purpose   {} on stream {stream}: {} (retention {} at the hub)\n          policy {} {}",
            m.name,
            m.description,
            crate::cli::explain::days(m.retention),
            flow.source.path().display(),
            stamp.hash_hex()
        );
    }
    if cfg.policies.legacy_purpose {
        let _ = writeln!(
            out,
            "note      [purpose] is an allow-list: its fields leave at full resolution; \
             prefer [policies] with policy files (config/policies/)"
        );
    }
    let _ = writeln!(
        out,
        "approve   at the hub, [[gateway]] id = \"{}\": policies = {}",
        cfg.gateway_id,
        crate::supervisor::approval_toml(&crate::supervisor::policy_stamps(cfg))
    );
    let buses = crate::source::rtu::spawn::bus_report(&cfg.devices);
    if !buses.is_empty() {
        let _ = write!(out, "\nrtu buses\n{buses}");
    }
    let _ = writeln!(out, "\ndevices   {}", cfg.devices.len());
    for s in &cfg.mqtt_sources {
        let _ = writeln!(
            out,
            "mqtt      source {} at {} (client id {}, qos {}, {})",
            s.name,
            s.broker,
            s.client_id,
            s.qos,
            if s.tls.is_some() {
                "TLS"
            } else {
                "PLAINTEXT: danger_plaintext"
            }
        );
    }
    for d in &cfg.devices {
        match (&d.kind, &d.profile.mqtt) {
            (DeviceKind::Modbus(m), _) => {
                device_report(&mut out, d, m, cfg, cfg.batch.alarm_state_every)
            }
            (DeviceKind::Mqtt(topic), Some(spec)) => {
                mqtt_device_report(&mut out, d, topic, spec, cfg)
            }
            // Refused by config validation: an MQTT device needs an MQTT profile.
            (DeviceKind::Mqtt(_), None) => {}
        }
    }
    (out, key_error)
}

fn device_report(
    out: &mut String,
    d: &crate::config::DeviceConfig,
    m: &crate::config::ModbusDevice,
    cfg: &GatewayConfig,
    alarm_every: std::time::Duration,
) {
    let p = &d.profile;
    let reads = plan(p);
    let _ = writeln!(
        out,
        "\n  {}  profile {} ({} {}, version {})  {}  unit {}  every {:?}  timeout {:?}{}",
        d.id,
        p.name,
        p.vendor,
        p.model,
        p.version,
        m.transport,
        m.unit,
        m.poll_interval,
        m.timeout,
        d.location
            .as_deref()
            .map(|l| format!("  location {l:?} (stays on the box)"))
            .unwrap_or_default()
    );
    if d.ratios != crate::profile::Ratios::UNITY {
        let _ = writeln!(
            out,
            "    secondary-side meter: ct_ratio {}  pt_ratio {} (fields with a ratio are scaled to primary values)",
            d.ratios.ct, d.ratios.pt
        );
    }
    let spans: Vec<String> = reads
        .iter()
        .map(|r| format!("{:#06x}+{}", r.start.0, r.count))
        .collect();
    let _ = writeln!(
        out,
        "    polls FC{:02} in {} request(s): {}",
        p.function.code(),
        reads.len(),
        spans.join(", ")
    );
    let _ = writeln!(
        out,
        "    {:<22} {:>8} {:<7} {:<5} {:<14} {:<18} leaves the box",
        "field", "register", "type", "order", "unit", "class"
    );
    for f in &p.fields {
        let (unit, class, leaves) = field_columns(f, cfg);
        let ty = match f.fraction {
            Some(frac) => format!("{}+{}", f.ty, frac.ty),
            None => f.ty.to_string(),
        };
        let mut notes = String::new();
        if let Some(frac) = f.fraction {
            let _ = write!(
                notes,
                "  [total = integer + fraction at {:#06x}]",
                frac.register
            );
        }
        if let Some(r) = f.ratio {
            let _ = write!(notes, "  [ratio {r} x{}]", d.ratios.multiplier(Some(r)));
        }
        if f.stream != crate::reading::Stream::Readings {
            let _ = write!(
                notes,
                "  [stream {}: on change, state every {:?}]",
                f.stream, alarm_every
            );
        }
        if !f.verified {
            notes.push_str("  [register unverified]");
        }
        let _ = writeln!(
            out,
            "    {:<22} {:>8} {:<7} {:<5} {:<14} {:<18} {}{}",
            f.name.as_str(),
            format!("{:#06x}", f.register),
            ty,
            f.order.to_string(),
            unit,
            class,
            leaves,
            notes
        );
    }
}

/// The unit, class and disposition columns of a field line.
fn field_columns(f: &crate::profile::Field, cfg: &GatewayConfig) -> (String, String, String) {
    let leaves = super::explain::leaves_summary(cfg, f);
    let unit = if f.unit.symbol == f.unit.canonical.symbol() {
        f.unit.symbol.to_string()
    } else {
        format!("{}→{}", f.unit.symbol, f.unit.canonical)
    };
    let class = format!(
        "{:?}/{:?}{}",
        f.class.category,
        f.class.grade,
        if f.class.personal { "/PI" } else { "" }
    )
    .to_lowercase();
    (unit, class, leaves)
}

fn mqtt_device_report(
    out: &mut String,
    d: &crate::config::DeviceConfig,
    topic: &crate::config::MqttTopic,
    spec: &crate::profile::mqtt::MqttSpec,
    cfg: &GatewayConfig,
) {
    let p = &d.profile;
    let _ = writeln!(
        out,
        "\n  {}  profile {} ({} {}, version {})  {}{}",
        d.id,
        p.name,
        p.vendor,
        p.model,
        p.version,
        topic,
        d.location
            .as_deref()
            .map(|l| format!("  location {l:?} (stays on the box)"))
            .unwrap_or_default()
    );
    let time = match (spec.shape, &spec.timestamp) {
        (crate::profile::mqtt::PayloadShape::Json, Some(t)) => {
            let format = format!("{:?}", spec.time_format).to_lowercase();
            format!("time at {t} ({format})")
        }
        (crate::profile::mqtt::PayloadShape::Json, None) => "time: receive time".to_string(),
        _ => "time from the payload (ms)".to_string(),
    };
    let _ = writeln!(out, "    payload {}, {time}", spec.shape.as_str());
    let _ = writeln!(
        out,
        "    {:<22} {:<44} {:<8} {:<14} {:<18} leaves the box",
        "field", "located at", "type", "unit", "class"
    );
    for (f, m) in p.fields.iter().zip(&spec.fields) {
        let (unit, class, leaves) = field_columns(f, cfg);
        let kind = match m.kind {
            crate::profile::mqtt::ValueKind::Bit(n) => format!("bit{n}"),
            k => format!("{k:?}").to_lowercase(),
        };
        let _ = writeln!(
            out,
            "    {:<22} {:<44} {:<8} {:<14} {:<18} {}{}{}",
            f.name.as_str(),
            m.locator.to_string(),
            kind,
            unit,
            class,
            leaves,
            if m.optional { "  [optional]" } else { "" },
            if f.verified { "" } else { "  [unverified]" }
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::GatewayConfig;
    use crate::profile::ProfileSet;

    fn shipped() -> ProfileSet {
        ProfileSet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles"))
            .expect("shipped profiles load")
    }

    #[test]
    fn report_shows_ratios_fractions_and_alarm_streams() {
        let devices = r#"[batch]
alarm_state_every = "10m"
[[device]]
name = "feeder"
profile = "acrel-adl400"
transport = { type = "tcp", address = "127.0.0.1:502" }
unit = 1
poll_interval = "10s"
ct_ratio = 40
[[device]]
name = "main"
profile = "oem-tuf-2000m"
transport = { type = "tcp", address = "127.0.0.1:502" }
unit = 2
poll_interval = "10s"
"#;
        let fields = r#""current_l1", "volume_forward", "signal_weak""#;
        let text = &crate::test_fixtures::gateway_config("ops", fields, devices);
        let cfg = GatewayConfig::parse(Path::new("/nonexistent/gw.toml"), text, Some(shipped()))
            .expect("config parses");
        let (out, key_error) = super::report(&cfg);
        assert!(!key_error);
        let line = |field: &str| {
            out.lines()
                .find(|l| l.trim_start().starts_with(&format!("{field} ")))
                .unwrap_or_else(|| panic!("no line for {field}:\n{out}"))
                .to_string()
        };
        assert!(out.contains("ct_ratio 40  pt_ratio 1"), "{out}");
        assert!(
            line("current_l1").contains("[ratio ct x40]"),
            "{}",
            line("current_l1")
        );
        assert!(line("active_power").contains("[ratio ct_pt x40]"));
        assert!(line("voltage_l1").contains("[ratio pt x1]"));
        assert!(!line("frequency").contains("ratio"));
        let volume = line("volume_forward");
        assert!(volume.contains("i32+f32"), "{volume}");
        assert!(volume.contains("integer + fraction at 0x000b"), "{volume}");
        let weak = line("signal_weak");
        assert!(
            weak.contains("[stream alarms: on change, state every 600s]"),
            "{weak}"
        );
        assert!(!line("flow_rate").contains("stream"));
        assert!(out.contains("polls FC03 in 4 request(s)"), "{out}");
    }
}

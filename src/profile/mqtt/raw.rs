//! The MQTT profile file as written (serde, `deny_unknown_fields`) and its one-time
//! conversion into a validated [`Profile`] with an [`MqttSpec`], collecting every error
//! with its location.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{is_json_pointer, Locator, MqttField, MqttSpec, PayloadShape, TimeFormat, ValueKind};
use crate::diag::{Diagnostic, SourceFile};
use crate::profile::raw::common::{self, default_true, Check, RawMeter};
use crate::profile::{Field, Profile, WordOrder};
use crate::reading::{Category, RegisterAddress, Stream};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqttProfile {
    meter: RawMeter,
    mqtt: RawMqtt,
    #[serde(rename = "field", default)]
    fields: Vec<RawMqttField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    shape: Spanned<String>,
    timestamp: Option<Spanned<String>>,
    timestamp_format: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqttField {
    name: Spanned<String>,
    pointer: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    #[serde(rename = "type")]
    ty: Option<Spanned<String>>,
    bit: Option<Spanned<u8>>,
    scale: Option<Spanned<f64>>,
    offset: Option<f64>,
    unit: Spanned<String>,
    range: Option<Spanned<Vec<f64>>>,
    #[serde(default)]
    sentinels: Vec<Spanned<toml::Value>>,
    counter: Option<Spanned<String>>,
    rollover: Option<Spanned<f64>>,
    /// Largest plausible change per second in `unit` (counters: of the increments).
    max_rate: Option<Spanned<f64>>,
    /// Identical values in a row from which a gauge counts as frozen.
    frozen_after: Option<Spanned<u32>>,
    /// Required; an `Option` so a missing one is reported with the valid values.
    category: Option<Spanned<String>>,
    grade: Option<Spanned<String>>,
    #[serde(default)]
    personal: bool,
    #[serde(default)]
    optional: bool,
    #[serde(default = "default_true")]
    verified: bool,
    note: Option<String>,
}

/// Parses and validates an MQTT profile; `path`'s stem names it.
pub(in crate::profile) fn parse(path: &Path, text: &str) -> Result<Profile, Vec<Diagnostic>> {
    let src = SourceFile::new(path, text);
    // `meter.protocol` is "mqtt": `declares_mqtt` chose this parser by it.
    let raw: RawMqttProfile = src.parse().map_err(|d| vec![d])?;
    let mut c = Check::new(src);
    let shape = PayloadShape::parse(raw.mqtt.shape.get_ref()).unwrap_or_else(|| {
        c.err(
            raw.mqtt.shape.span(),
            "mqtt.shape".into(),
            format!(
                "unknown payload shape {:?}; valid: {}",
                raw.mqtt.shape.get_ref(),
                PayloadShape::NAMES
            ),
        );
        PayloadShape::Json
    });
    let builtin_time = match shape {
        PayloadShape::Json => None,
        PayloadShape::ThingsBoard => Some("ThingsBoard carries its time in `ts` (ms)"),
        PayloadShape::Alink => Some("Alink carries its time in each property's `time` (ms)"),
    };
    for (key, span) in [
        (
            "mqtt.timestamp",
            raw.mqtt.timestamp.as_ref().map(Spanned::span),
        ),
        (
            "mqtt.timestamp_format",
            raw.mqtt.timestamp_format.as_ref().map(Spanned::span),
        ),
    ] {
        if let (Some(why), Some(span)) = (builtin_time, span) {
            c.err(
                span,
                key.into(),
                format!("only shape \"json\" takes {key}: {why}"),
            );
        }
    }
    let timestamp = raw.mqtt.timestamp.as_ref().and_then(|t| {
        if is_json_pointer(t.get_ref()) {
            Some(t.get_ref().clone())
        } else {
            c.err(t.span(), "mqtt.timestamp".into(), pointer_help(t.get_ref()));
            None
        }
    });
    let time_format = match raw.mqtt.timestamp_format.as_ref() {
        None => TimeFormat::Millis,
        Some(f) => match f.get_ref().as_str() {
            "ms" => TimeFormat::Millis,
            "s" => TimeFormat::Seconds,
            "iso8601" | "rfc3339" => TimeFormat::Iso8601,
            other => {
                c.err(
                    f.span(),
                    "mqtt.timestamp_format".into(),
                    format!(
                        "unknown timestamp format {other:?}; valid: {}",
                        TimeFormat::NAMES
                    ),
                );
                TimeFormat::Millis
            }
        },
    };

    let mut fields = Vec::with_capacity(raw.fields.len());
    let mut mqtt_fields: Vec<MqttField> = Vec::with_capacity(raw.fields.len());
    for (i, f) in raw.fields.into_iter().enumerate() {
        let name_span = f.name.span();
        if let Some((field, mf)) = convert_field(&mut c, &format!("field[{i}]"), f, shape) {
            if let Some(other) = mqtt_fields.iter().find(|o| o.name == mf.name) {
                c.err(
                    name_span.clone(),
                    format!("field[{i}].name"),
                    format!("field name `{}` is used twice", other.name),
                );
            }
            fields.push(field);
            mqtt_fields.push(mf);
        }
    }
    c.finish(fields.is_empty())?;
    Ok(Profile {
        mqtt: Some(MqttSpec {
            shape,
            timestamp,
            time_format,
            fields: mqtt_fields,
        }),
        ..common::profile(path, text, raw.meter, fields)
    })
}

fn pointer_help(p: &str) -> String {
    format!(
        "{p:?} is not a JSON pointer (RFC 6901); valid: \"\" or \"/\"-separated steps such as \
         \"/params/flow\" or \"/data/0/value\", with \"~\" written \"~0\" and \"/\" inside a step \"~1\""
    )
}

fn convert_field(
    c: &mut Check<'_>,
    key: &str,
    f: RawMqttField,
    shape: PayloadShape,
) -> Option<(Field, MqttField)> {
    let before = c.errors.len();
    let (name, key) = common::name(c, key, &f.name);
    let locator = match (shape, &f.pointer, &f.key) {
        (PayloadShape::Json, Some(p), None) => {
            if !is_json_pointer(p.get_ref()) {
                c.err(
                    p.span(),
                    format!("{key}.pointer"),
                    pointer_help(p.get_ref()),
                );
            }
            Some(Locator::Pointer(p.get_ref().clone()))
        }
        (PayloadShape::ThingsBoard | PayloadShape::Alink, None, Some(k)) => {
            if k.get_ref().is_empty() {
                c.err(
                    k.span(),
                    format!("{key}.key"),
                    "key must not be empty".into(),
                );
            }
            Some(Locator::Key(k.get_ref().clone()))
        }
        (PayloadShape::Json, _, Some(k)) => {
            c.err(
                k.span(),
                format!("{key}.key"),
                "shape \"json\" locates fields by `pointer = \"/path/to/value\"`, not `key`".into(),
            );
            None
        }
        (_, Some(p), _) => {
            c.err(
                p.span(),
                format!("{key}.pointer"),
                format!(
                    "shape {:?} locates fields by `key = \"TelemetryKey\"`, not `pointer`",
                    shape.as_str()
                ),
            );
            None
        }
        (_, None, None) => {
            let (want, example) = match shape {
                PayloadShape::Json => ("pointer", "\"/params/flow\""),
                _ => ("key", "\"flow\""),
            };
            c.err(
                f.name.span(),
                format!("{key}.{want}"),
                format!(
                    "a field of shape {:?} needs `{want} = {example}`",
                    shape.as_str()
                ),
            );
            None
        }
    };
    let kind = match (
        f.ty.as_ref().map(|t| (t.get_ref().as_str(), t.span())),
        &f.bit,
    ) {
        (None | Some(("number", _)), None) => Some(ValueKind::Number),
        (Some(("integer", _)), None) => Some(ValueKind::Integer),
        (Some(("bool", _)), None) => Some(ValueKind::Bool),
        (Some(("text", _)), None) => Some(ValueKind::Text),
        (Some(("bit", _)), Some(b)) if *b.get_ref() <= 63 => Some(ValueKind::Bit(*b.get_ref())),
        (Some(("bit", _)), Some(b)) => {
            c.err(
                b.span(),
                format!("{key}.bit"),
                format!(
                    "bit {} does not exist in a 64-bit integer; valid: 0..=63",
                    b.get_ref()
                ),
            );
            None
        }
        (Some(("bit", span)), None) => {
            c.err(
                span,
                format!("{key}.type"),
                "type \"bit\" needs `bit = N` (0 = least significant bit of the integer)".into(),
            );
            None
        }
        (Some((other, span)), _) if !["number", "integer", "bool", "text"].contains(&other) => {
            c.err(
                span,
                format!("{key}.type"),
                format!("unknown value type {other:?}; valid: {}", ValueKind::NAMES),
            );
            None
        }
        (_, Some(b)) => {
            c.err(
                b.span(),
                format!("{key}.bit"),
                "`bit` only applies to type \"bit\"".into(),
            );
            None
        }
        (Some((other, span)), None) => {
            c.err(
                span,
                format!("{key}.type"),
                format!("unknown value type {other:?}; valid: {}", ValueKind::NAMES),
            );
            None
        }
    };
    let unit = common::unit(c, &key, &f.unit);
    let scale = common::scale(c, &key, f.scale.as_ref());
    let scaled = f.scale.is_some() || f.offset.is_some();
    let not_numeric = match kind {
        Some(ValueKind::Text) => Some("text"),
        Some(ValueKind::Bool | ValueKind::Bit(_)) => Some("a flag"),
        _ => None,
    };
    if let (Some(what), true) = (
        not_numeric,
        scaled || f.counter.is_some() || f.range.is_some(),
    ) {
        let span = f.ty.as_ref().map_or(f.name.span(), Spanned::span);
        c.err(
            span,
            format!("{key}.type"),
            format!("{what} takes no scale, offset, range or counter"),
        );
    }
    let range = common::range(c, &key, f.range.as_ref());
    let sentinels = f
        .sentinels
        .iter()
        .filter_map(|s| match s.get_ref() {
            toml::Value::Integer(i) => Some(*i as u64),
            toml::Value::String(h) => common::hex_sentinel(h)
                .map_err(|m| c.err(s.span(), format!("{key}.sentinels"), m))
                .ok(),
            other => {
                c.err(
                    s.span(),
                    format!("{key}.sentinels"),
                    format!("sentinel {other} must be an integer or a hex string"),
                );
                None
            }
        })
        .collect();
    let counter = common::counter(c, &key, f.counter.as_ref(), f.rollover.as_ref());
    let (max_rate, frozen_after) = common::quality_limits(
        c,
        &key,
        not_numeric.is_none(),
        counter,
        f.max_rate.as_ref(),
        f.frozen_after.as_ref(),
    );
    let class = common::classification(
        c,
        &key,
        &f.name,
        f.category.as_ref(),
        f.grade.as_ref(),
        f.personal,
    );
    if c.errors.len() > before {
        return None;
    }
    let (name, kind) = (name?, kind?);
    let class = class?;
    let field = Field {
        name: name.clone(),
        register: 0,
        address: RegisterAddress(0),
        ty: kind.field_type(),
        order: WordOrder::default(),
        scale,
        offset: f.offset.unwrap_or(0.0),
        unit: unit?,
        range,
        sentinels,
        counter,
        max_rate,
        frozen_after,
        class,
        verified: f.verified,
        note: f.note,
        // MQTT meters publish primary-side values and whole totals; alarm flags travel on
        // the alarms stream like the Modbus profiles' (`category = "alarm"`).
        fraction: None,
        ratio: None,
        stream: if class.category == Category::Alarm {
            Stream::Alarms
        } else {
            Stream::Readings
        },
    };
    let mqtt = MqttField {
        name,
        locator: locator?,
        kind,
        optional: f.optional,
    };
    Some((field, mqtt))
}

#[cfg(test)]
mod tests {
    use super::super::declares_mqtt;
    use super::*;
    use crate::profile::{Counter, FieldType};

    const GOOD: &str = r#"
[meter]
vendor = "Test"
model = "W1"
protocol = "mqtt"

[mqtt]
shape = "json"
timestamp = "/data/0/eventTime"
timestamp_format = "iso8601"

[[field]]
name = "volume_forward"
pointer = "/data/0/serviceData/totalVolume"
unit = "m3"
range = [0.0, 1e8]
counter = "monotonic"
category = "measurement"
grade = "L3"

[[field]]
name = "battery_low"
pointer = "/data/0/serviceData/alarm"
type = "bit"
bit = 2
unit = "1"
category = "alarm"
grade = "L2"
"#;

    fn parse_str(text: &str) -> Result<Profile, Vec<Diagnostic>> {
        Profile::parse(Path::new("firmware-profiles/test-w1.toml"), text)
    }

    fn one_error(text: &str) -> Diagnostic {
        let errs = parse_str(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.into_iter().next().unwrap()
    }

    #[test]
    fn good_profile_loads_as_ordinary_fields_plus_locators() {
        let p = parse_str(GOOD).unwrap();
        assert_eq!(p.name, "test-w1");
        let spec = p.mqtt.as_ref().unwrap();
        assert_eq!(spec.shape, PayloadShape::Json);
        assert_eq!(spec.time_format, TimeFormat::Iso8601);
        assert_eq!(spec.fields.len(), p.fields.len());
        assert_eq!(
            spec.fields[0].locator,
            Locator::Pointer("/data/0/serviceData/totalVolume".into())
        );
        assert_eq!(spec.fields[1].kind, ValueKind::Bit(2));
        let vol = p.field("volume_forward").unwrap();
        assert!(matches!(vol.counter, Counter::Monotonic { .. }));
        assert_eq!(vol.ty, FieldType::F64);
        assert_eq!(
            p.field("battery_low").unwrap().class.category,
            Category::Alarm
        );
    }

    #[test]
    fn bad_pointer_is_located_and_explained() {
        let e =
            one_error(&GOOD.replacen("\"/data/0/serviceData/totalVolume\"", "\"data.volume\"", 1));
        assert_eq!(e.line, 14, "{e}");
        assert!(e.key.ends_with("(volume_forward).pointer"), "{e}");
        assert!(e.message.contains("RFC 6901"), "{e}");
        let e = one_error(&GOOD.replacen("/data/0/eventTime", "/a~2b", 1));
        assert_eq!(e.key, "mqtt.timestamp", "{e}");
    }

    #[test]
    fn shape_and_locator_mismatches_are_rejected() {
        let e = one_error(&GOOD.replacen("shape = \"json\"", "shape = \"sparkplug\"", 1));
        assert!(e.message.contains("\"thingsboard\""), "{e}");
        let tb = GOOD
            .replacen("shape = \"json\"", "shape = \"thingsboard\"", 1)
            .replacen("timestamp = \"/data/0/eventTime\"\n", "", 1)
            .replacen("timestamp_format = \"iso8601\"\n", "", 1);
        let errs = parse_str(&tb).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].message.contains("`key"), "{}", errs[0]);
        let tb_ts = GOOD.replacen("shape = \"json\"", "shape = \"alink\"", 1);
        let errs = parse_str(&tb_ts).unwrap_err();
        assert!(errs.iter().any(|e| e.key == "mqtt.timestamp"), "{errs:?}");
    }

    #[test]
    fn register_keys_and_bad_kinds_are_rejected() {
        let e = one_error(&GOOD.replacen("unit = \"m3\"", "unit = \"m3\"\nregister = 3", 1));
        assert!(e.to_string().contains("register"), "{e}");
        let e = one_error(&GOOD.replacen("type = \"bit\"", "type = \"u16\"", 1));
        assert!(e.message.contains("\"integer\""), "{e}");
        let e = one_error(&GOOD.replacen("bit = 2", "bit = 64", 1));
        assert!(e.message.contains("0..=63"), "{e}");
        let e = one_error(&GOOD.replacen("bit = 2\n", "bit = 2\nscale = 2.0\n", 1));
        assert!(e.message.contains("no scale"), "{e}");
    }

    #[test]
    fn modbus_profiles_are_not_taken_for_mqtt() {
        assert!(declares_mqtt(GOOD));
        assert!(!declares_mqtt(&GOOD.replacen("\"mqtt\"", "\"modbus\"", 1)));
        assert!(!declares_mqtt("not toml ["));
    }

    #[test]
    fn json_pointer_syntax() {
        for ok in ["", "/", "/a/0", "/a~1b/~0", "/params/Flow"] {
            assert!(is_json_pointer(ok), "{ok}");
        }
        for bad in ["a", "a/b", "/a~", "/~2"] {
            assert!(!is_json_pointer(bad), "{bad}");
        }
    }

    /// Issue 11: an MQTT profile field needs its classification too, and its quality
    /// limits follow the same rules as a register field's.
    #[test]
    fn classification_and_quality_limits_are_checked() {
        let e = one_error(&GOOD.replacen("category = \"alarm\"\n", "", 1));
        assert_eq!(e.line, 22, "the field's name line: {e}");
        assert!(e.key.ends_with("(battery_low).category"), "{e}");
        assert!(e.message.contains("\"identifier\", \"measurement\""), "{e}");
        let e = one_error(&GOOD.replacen(
            "counter = \"monotonic\"",
            "counter = \"monotonic\"\nfrozen_after = 5",
            1,
        ));
        assert!(e.key.ends_with("(volume_forward).frozen_after"), "{e}");
        let e = one_error(&GOOD.replacen("bit = 2", "bit = 2\nmax_rate = 1.0", 1));
        assert!(e.key.ends_with("(battery_low).max_rate"), "{e}");
        let p = parse_str(&GOOD.replacen(
            "counter = \"monotonic\"",
            "counter = \"monotonic\"\nmax_rate = 0.5",
            1,
        ))
        .unwrap();
        assert_eq!(p.field("volume_forward").unwrap().max_rate, Some(0.5));
    }
}

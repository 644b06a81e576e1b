//! Named values (MQTT payloads) → typed [`Reading`]s in canonical units.
//!
//! The same rules as register images (`transform::normalise`), through the same
//! helper: engineering = raw × scale + offset in the profile's unit, then × the unit's
//! factor; integers that no scaling touches stay integers; flags become booleans; a
//! NaN/infinite result is `bad(not_finite)`. A raw integer the profile lists as a
//! sentinel is kept as published and flagged `bad(not_available)` (floats are never
//! compared with sentinels). Text values (identifiers) pass through unchanged.
//!
//! A value whose timestamp is the gateway's receive time rather than the meter's
//! ([`TimeSource::Received`]) is marked `uncertain(receive_time)`, and one whose meter
//! clock runs ahead or behind ([`TimeSource::Skewed`]) `uncertain(clock_skew)`, unless something
//! worse applies. A value naming a field the profile lacks (a source bug, not a payload
//! problem) is reported in `missing` instead of becoming a reading.

use super::normalise::{to_value, Normalised};
use crate::profile::{Field, Profile, Ratios, RawValue};
use crate::reading::{DeviceId, Quality, QualityReason, Reading, Value};
use crate::source::{NamedValue, SourceValue, TimeSource};

/// Turns every named value into a reading of its profile field.
/// `ratios` apply to fields with a `ratio`, as for register images.
pub fn normalise_values(
    profile: &Profile,
    device: &DeviceId,
    values: &[NamedValue],
    ratios: &Ratios,
) -> Normalised {
    let mut out = Normalised {
        readings: Vec::with_capacity(values.len()),
        missing: Vec::new(),
    };
    for v in values {
        match profile.field(v.field.as_str()) {
            Some(field) => {
                let multiplier = ratios.multiplier(field.ratio);
                out.readings
                    .push(normalise_value(field, device, v, multiplier));
            }
            None => out.missing.push(v.field.clone()),
        }
    }
    out
}

/// One named value as a reading of `field`.
pub(crate) fn normalise_value(
    field: &Field,
    device: &DeviceId,
    v: &NamedValue,
    multiplier: f64,
) -> Reading {
    let (value, mut quality) = match &v.value {
        SourceValue::Raw(raw) => {
            let (value, quality) = to_value(field, *raw, multiplier);
            let sentinel = sentinel_bits(*raw).is_some_and(|b| field.sentinels.contains(&b));
            if sentinel {
                (value, Quality::Bad(QualityReason::NotAvailable))
            } else {
                (value, quality)
            }
        }
        SourceValue::Text(s) => (Value::Text(s.clone()), Quality::Good),
    };
    match v.time {
        TimeSource::Device => {}
        TimeSource::Received => {
            quality = quality.worst(Quality::Uncertain(QualityReason::ReceiveTime));
        }
        TimeSource::Skewed => quality = quality.worst(Quality::Uncertain(QualityReason::ClockSkew)),
    }
    Reading {
        device: device.clone(),
        field: field.name.clone(),
        value,
        unit: field.unit.canonical,
        at_ms: v.at_ms,
        quality,
        class: field.class,
    }
}

/// The bit pattern a published integer is compared with the sentinels as (two's
/// complement for negative numbers, like a 64-bit register).
fn sentinel_bits(raw: RawValue) -> Option<u64> {
    match raw {
        RawValue::Unsigned(u) => Some(u),
        RawValue::Signed(i) => Some(i as u64),
        RawValue::Float(_) | RawValue::Bit(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;
    use crate::reading::{FieldName, Unit};
    use std::path::Path;

    const PROFILE: &str = r#"
[meter]
vendor = "Test"
model = "W1"
protocol = "mqtt"
[mqtt]
shape = "json"
[[field]]
name = "volume_forward"
pointer = "/v"
type = "integer"
scale = 0.001
unit = "m3"
counter = "monotonic"
sentinels = [4294967295]
category = "measurement"
grade = "L3"
[[field]]
name = "flow_rate"
pointer = "/f"
unit = "L/h"
category = "measurement"
grade = "L3"
[[field]]
name = "alarm_count"
pointer = "/a"
type = "integer"
unit = "1"
sentinels = [-1]
category = "status"
grade = "L2"
[[field]]
name = "valve_open"
pointer = "/s"
type = "bit"
bit = 0
unit = "1"
category = "status"
grade = "L2"
[[field]]
name = "serial_number"
pointer = "/id"
type = "text"
unit = "1"
category = "identifier"
grade = "L3"
"#;

    fn profile() -> Profile {
        Profile::parse(Path::new("test-w1.toml"), PROFILE).unwrap()
    }

    fn nv(field: &str, value: SourceValue, time: TimeSource) -> NamedValue {
        NamedValue {
            field: FieldName::new(field).unwrap(),
            value,
            at_ms: 42,
            time,
        }
    }

    #[test]
    fn scales_converts_and_keeps_types() {
        let p = profile();
        let dev = DeviceId::new("w").unwrap();
        let values = [
            nv(
                "volume_forward",
                SourceValue::Raw(RawValue::Signed(123_456)),
                TimeSource::Device,
            ),
            nv(
                "flow_rate",
                SourceValue::Raw(RawValue::Float(500.0)),
                TimeSource::Device,
            ),
            nv(
                "alarm_count",
                SourceValue::Raw(RawValue::Signed(3)),
                TimeSource::Device,
            ),
            nv(
                "valve_open",
                SourceValue::Raw(RawValue::Bit(true)),
                TimeSource::Device,
            ),
            nv(
                "serial_number",
                SourceValue::Text("W-17".into()),
                TimeSource::Device,
            ),
            nv(
                "not_in_profile",
                SourceValue::Raw(RawValue::Signed(1)),
                TimeSource::Device,
            ),
        ];
        let n = normalise_values(&p, &dev, &values, &Ratios::UNITY);
        assert_eq!(n.missing, vec![FieldName::new("not_in_profile").unwrap()]);
        let by = |f: &str| n.readings.iter().find(|r| r.field.as_str() == f).unwrap();
        let vol = by("volume_forward");
        assert_eq!(vol.unit, Unit::CubicMetre);
        assert!((vol.value.as_f64().unwrap() - 123.456).abs() < 1e-9);
        let flow = by("flow_rate");
        assert_eq!(flow.unit, Unit::CubicMetrePerHour);
        assert!((flow.value.as_f64().unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(by("alarm_count").value, Value::Int(3));
        assert_eq!(by("valve_open").value, Value::Bool(true));
        assert_eq!(by("serial_number").value, Value::Text("W-17".into()));
        assert!(n
            .readings
            .iter()
            .all(|r| r.quality == Quality::Good && r.at_ms == 42));
    }

    #[test]
    fn sentinels_non_finite_and_receive_time_are_flagged() {
        let p = profile();
        let dev = DeviceId::new("w").unwrap();
        let q = |field: &str, raw: RawValue, time: TimeSource| {
            normalise_value(
                p.field(field).unwrap(),
                &dev,
                &nv(field, SourceValue::Raw(raw), time),
                1.0,
            )
            .quality
        };
        let na = Quality::Bad(QualityReason::NotAvailable);
        assert_eq!(
            q(
                "volume_forward",
                RawValue::Unsigned(0xFFFF_FFFF),
                TimeSource::Device
            ),
            na
        );
        assert_eq!(
            q("alarm_count", RawValue::Signed(-1), TimeSource::Received),
            na,
            "bad wins over uncertain"
        );
        assert_eq!(
            q(
                "flow_rate",
                RawValue::Float(f64::INFINITY),
                TimeSource::Device
            ),
            Quality::Bad(QualityReason::NotFinite)
        );
        assert_eq!(
            q("flow_rate", RawValue::Float(1.0), TimeSource::Received),
            Quality::Uncertain(QualityReason::ReceiveTime)
        );
        assert_eq!(
            q("flow_rate", RawValue::Float(1.0), TimeSource::Skewed),
            Quality::Uncertain(QualityReason::ClockSkew)
        );
    }
}

//! Register images → typed [`Reading`]s in canonical units.
//!
//! engineering = raw × scale + offset (in the profile's unit); canonical = engineering ×
//! the unit's factor (kW → W ×1000, L → m³ ×0.001). Integers that no scaling touches stay
//! integers; bits become booleans. A raw pattern the profile lists as a sentinel is kept
//! as read and flagged `bad(not_available)`; a NaN/infinite float is flagged
//! `bad(not_finite)`. A field whose registers are not in the image is reported missing.

use crate::profile::{decode, Field, FieldType, Profile, RawValue};
use crate::reading::{DeviceId, FieldName, Quality, QualityReason, Reading, TimestampMs, Value};
use crate::source::RegisterImage;

/// The result of normalising one poll.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Normalised {
    pub readings: Vec<Reading>,
    /// Fields whose registers were not read (their request failed).
    pub missing: Vec<FieldName>,
}

/// Decodes every field of `profile` found in `image`.
pub fn normalise(
    profile: &Profile,
    device: &DeviceId,
    at_ms: TimestampMs,
    image: &RegisterImage,
) -> Normalised {
    let mut out = Normalised {
        readings: Vec::with_capacity(profile.fields.len()),
        missing: Vec::new(),
    };
    for field in &profile.fields {
        match image.get(field.address, field.words()) {
            Some(words) => out
                .readings
                .push(normalise_field(field, device, at_ms, words)),
            None => out.missing.push(field.name.clone()),
        }
    }
    out
}

/// Raw register bits as one big-endian integer, for sentinel comparison.
fn raw_bits(field: &Field, words: &[u16]) -> u64 {
    let ty = match field.ty {
        FieldType::Bit(_) => FieldType::U16,
        t => t,
    };
    match decode::decode(ty, field.order, words) {
        Ok(RawValue::Unsigned(u)) => u,
        Ok(RawValue::Signed(i)) => i as u64 & width_mask(field),
        Ok(RawValue::Float(f)) if field.ty == FieldType::F32 => u64::from((f as f32).to_bits()),
        Ok(RawValue::Float(f)) => f.to_bits(),
        Ok(RawValue::Bit(b)) => u64::from(b),
        Err(_) => 0,
    }
}

fn width_mask(field: &Field) -> u64 {
    match field.words() {
        4 => u64::MAX,
        w => (1u64 << (16 * u32::from(w))) - 1,
    }
}

/// Decodes one field from exactly its registers.
pub fn normalise_field(
    field: &Field,
    device: &DeviceId,
    at_ms: TimestampMs,
    words: &[u16],
) -> Reading {
    let (value, mut quality) = match decode::decode(field.ty, field.order, words) {
        Ok(raw) => to_value(field, raw),
        // The image lookup returns exactly `words()` registers, so this is unreachable in
        // practice; keep it typed rather than panic.
        Err(_) => (
            Value::Float(f64::NAN),
            Quality::Bad(QualityReason::NotFinite),
        ),
    };
    if !field.sentinels.is_empty() && field.sentinels.contains(&raw_bits(field, words)) {
        quality = Quality::Bad(QualityReason::NotAvailable);
    }
    Reading {
        device: device.clone(),
        field: field.name.clone(),
        value,
        unit: field.unit.canonical,
        at_ms,
        quality,
        class: field.class,
    }
}

/// A decoded raw value as a typed value in canonical units, with its quality (shared by
/// the register and the named-value paths).
pub(crate) fn to_value(field: &Field, raw: RawValue) -> (Value, Quality) {
    match raw {
        RawValue::Bit(b) => (Value::Bool(b), Quality::Good),
        RawValue::Signed(i) if field.keeps_integer() => (Value::Int(i), Quality::Good),
        RawValue::Unsigned(u) if field.keeps_integer() && i64::try_from(u).is_ok() => {
            (Value::Int(u as i64), Quality::Good)
        }
        raw => {
            let v = (raw.as_f64() * field.scale + field.offset) * field.unit.factor;
            let q = if v.is_finite() {
                Quality::Good
            } else {
                Quality::Bad(QualityReason::NotFinite)
            };
            (Value::Float(v), q)
        }
    }
}

/// The engineering value (profile unit) of a canonical reading value, for range checks.
pub fn engineering(field: &Field, value: &Value) -> Option<f64> {
    value.as_f64().map(|v| v / field.unit.factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{RegisterAddress, Unit};
    use std::path::Path;

    const PROFILE: &str = r#"
[meter]
vendor = "Test"
model = "N1"
protocol = "modbus"
[modbus]
function = 3
[[field]]
name = "active_power"
register = 0
type = "f32"
unit = "kW"
category = "measurement"
grade = "L3"
[[field]]
name = "energy_import"
register = 2
type = "u32"
order = "CDAB"
scale = 0.01
unit = "kWh"
sentinels = [0xFFFFFFFF]
counter = "monotonic"
category = "measurement"
grade = "L3"
[[field]]
name = "serial_number"
register = 4
type = "u32"
unit = "1"
category = "identifier"
grade = "L3"
[[field]]
name = "valve_open"
register = 6
type = "bit"
bit = 1
unit = "1"
category = "status"
grade = "L2"
[[field]]
name = "temperature"
register = 7
type = "i16"
scale = 0.1
unit = "degC"
category = "measurement"
grade = "L1"
"#;

    fn profile() -> Profile {
        Profile::parse(Path::new("n1.toml"), PROFILE).unwrap()
    }

    #[test]
    fn decodes_and_converts_to_canonical_units() {
        let p = profile();
        let dev = DeviceId::new("m1").unwrap();
        let mut img = RegisterImage::new();
        // 1.1 kW, 1234.56 kWh (123456 = 0x0001_E240, low word first), serial 0x00BC614E,
        // status 0b10, -5.5 degC
        img.insert(
            RegisterAddress(0),
            vec![0x3F8C, 0xCCCD, 0xE240, 0x0001, 0x00BC, 0x614E, 0b10, 0xFFC9],
        );
        let n = normalise(&p, &dev, 7, &img);
        assert!(n.missing.is_empty());
        let by = |name: &str| {
            n.readings
                .iter()
                .find(|r| r.field.as_str() == name)
                .unwrap()
        };
        let power = by("active_power");
        assert_eq!(power.unit, Unit::Watt);
        assert!(
            (power.value.as_f64().unwrap() - 1100.0).abs() < 1e-3,
            "{:?}",
            power.value
        );
        let energy = by("energy_import");
        assert_eq!(energy.unit, Unit::WattHour);
        assert!((energy.value.as_f64().unwrap() - 1_234_560.0).abs() < 1e-6);
        assert_eq!(by("serial_number").value, Value::Int(12_345_678));
        assert_eq!(by("valve_open").value, Value::Bool(true));
        assert!((by("temperature").value.as_f64().unwrap() + 5.5).abs() < 1e-9);
        assert!(n
            .readings
            .iter()
            .all(|r| r.quality == Quality::Good && r.at_ms == 7));
    }

    #[test]
    fn sentinel_is_flagged_not_rewritten() {
        let p = profile();
        let field = p.field("energy_import").unwrap();
        let r = normalise_field(field, &DeviceId::new("m1").unwrap(), 0, &[0xFFFF, 0xFFFF]);
        assert_eq!(r.quality, Quality::Bad(QualityReason::NotAvailable));
        assert!((r.value.as_f64().unwrap() - 4_294_967_295.0 * 10.0).abs() < 1.0);
    }

    #[test]
    fn missing_blocks_are_reported() {
        let p = profile();
        let mut img = RegisterImage::new();
        img.insert(RegisterAddress(0), vec![0, 0]);
        let n = normalise(&p, &DeviceId::new("m1").unwrap(), 0, &img);
        assert_eq!(n.readings.len(), 1);
        assert_eq!(n.missing.len(), 4);
    }

    #[test]
    fn nan_is_flagged() {
        let p = profile();
        let r = normalise_field(
            p.field("active_power").unwrap(),
            &DeviceId::new("m").unwrap(),
            0,
            &[0x7FC0, 0],
        );
        assert_eq!(r.quality, Quality::Bad(QualityReason::NotFinite));
    }
}

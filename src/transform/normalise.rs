//! Register images → typed [`Reading`]s in canonical units.
//!
//! engineering = raw × scale + offset (in the profile's unit); canonical = engineering ×
//! the unit's factor (kW → W ×1000, L → m³ ×0.001). Integers that no scaling touches stay
//! integers; bits become booleans. A raw pattern the profile lists as a sentinel is kept
//! as read and flagged `bad(not_available)`; a NaN/infinite float is flagged
//! `bad(not_finite)`. A field whose registers are not in the image is reported missing.
//!
//! A combined total (a field with a `fraction`) is integer part + fraction, then scaled:
//! engineering = (integer + fraction) × scale + offset; it is always a float, and
//! missing unless both parts are in the image. A field with a `ratio` is a secondary-side
//! value: its canonical value is multiplied by the device's CT, PT or CT × PT ratio
//! ([`Ratios`]) and is always a float; range checks divide it back out
//! (`check::Checker::check_scaled`).
//!
//! Values keep their source's precision (`profile::decimal`): an f32 arrives as its
//! shortest decimal, and a scaled value is rounded to the decimal digits the exact
//! computation has, so 123456 × 0.01 is 1234.56, not 1234.5600000000002. Unit factors
//! (kWh → Wh × 1000) stay exact.

use crate::profile::decimal::Precision;
use crate::profile::{decode, Field, FieldType, Profile, Ratios, RawValue};
use crate::reading::{DeviceId, FieldName, Quality, QualityReason, Reading, TimestampMs, Value};
use crate::source::RegisterImage;

/// The result of normalising one poll.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Normalised {
    pub readings: Vec<Reading>,
    /// Fields whose registers were not read (their request failed).
    pub missing: Vec<FieldName>,
}

/// Decodes every field of `profile` found in `image` (a direct-connected meter: no
/// transformer ratios).
pub fn normalise(
    profile: &Profile,
    device: &DeviceId,
    at_ms: TimestampMs,
    image: &RegisterImage,
) -> Normalised {
    normalise_with(profile, device, at_ms, image, &Ratios::UNITY)
}

/// Decodes every field of `profile` found in `image`, applying the device's transformer
/// `ratios` to the fields that name one.
pub fn normalise_with(
    profile: &Profile,
    device: &DeviceId,
    at_ms: TimestampMs,
    image: &RegisterImage,
    ratios: &Ratios,
) -> Normalised {
    let mut out = Normalised {
        readings: Vec::with_capacity(profile.fields.len()),
        missing: Vec::new(),
    };
    for field in &profile.fields {
        let words = image.get(field.address, field.words());
        let fraction = field.fraction.map(|f| image.get(f.address, f.ty.words()));
        match (words, fraction) {
            (Some(words), None) => out.readings.push(normalise_parts(
                field,
                device,
                at_ms,
                words,
                None,
                ratios.multiplier(field.ratio),
            )),
            (Some(words), Some(Some(frac))) => out.readings.push(normalise_parts(
                field,
                device,
                at_ms,
                words,
                Some(frac),
                ratios.multiplier(field.ratio),
            )),
            _ => out.missing.push(field.name.clone()),
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

/// Decodes one field from exactly its registers (no fraction part, no ratio).
pub(crate) fn normalise_field(
    field: &Field,
    device: &DeviceId,
    at_ms: TimestampMs,
    words: &[u16],
) -> Reading {
    normalise_parts(field, device, at_ms, words, None, 1.0)
}

/// Decodes one field from its registers and, for a combined total, its fraction's
/// registers; `multiplier` is the device's transformer ratio for the field (1 without).
pub(crate) fn normalise_parts(
    field: &Field,
    device: &DeviceId,
    at_ms: TimestampMs,
    words: &[u16],
    fraction: Option<&[u16]>,
    multiplier: f64,
) -> Reading {
    let decoded = decode::decode(field.ty, field.order, words).and_then(|raw| {
        match (field.fraction, fraction) {
            (Some(f), Some(fw)) => decode::decode(f.ty, field.order, fw)
                .map(|frac| RawValue::Float(combined(raw, frac))),
            _ => Ok(raw),
        }
    });
    let (value, mut quality) = match decoded {
        Ok(raw) => to_value(field, raw, multiplier),
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
/// the register and the named-value paths). `multiplier` is the device's CT/PT factor
/// for the field (1 for most).
pub(crate) fn to_value(field: &Field, raw: RawValue, multiplier: f64) -> (Value, Quality) {
    match raw {
        RawValue::Bit(b) => (Value::Bool(b), Quality::Good),
        RawValue::Signed(i) if field.keeps_integer() => (Value::Int(i), Quality::Good),
        RawValue::Unsigned(u) if field.keeps_integer() && i64::try_from(u).is_ok() => {
            (Value::Int(u as i64), Quality::Good)
        }
        raw => {
            let v = (raw.as_f64() * field.scale + field.offset) * field.unit.factor * multiplier;
            let v = precision(field, raw, multiplier).map_or(v, |p| p.settle(v));
            let q = if v.is_finite() {
                Quality::Good
            } else {
                Quality::Bad(QualityReason::NotFinite)
            };
            (Value::Float(v), q)
        }
    }
}

/// The digits of a raw value: an integer has none after the point, a float those of its
/// shortest decimal.
fn raw_precision(raw: RawValue) -> Option<Precision> {
    match raw {
        RawValue::Unsigned(u) => Some(Precision::integer(i128::from(u))),
        RawValue::Signed(i) => Some(Precision::integer(i128::from(i))),
        RawValue::Float(f) => Precision::of(f),
        RawValue::Bit(b) => Some(Precision::integer(i128::from(u8::from(b)))),
    }
}

/// A combined total's integer part plus its fraction, without binary noise.
fn combined(integer: RawValue, fraction: RawValue) -> f64 {
    let sum = integer.as_f64() + fraction.as_f64();
    raw_precision(integer)
        .zip(raw_precision(fraction))
        .map_or(sum, |(a, b)| a.plus(b).settle(sum))
}

/// Bounds on the decimal digits of `raw × scale + offset`, × unit factor × `multiplier`,
/// computed exactly.
fn precision(field: &Field, raw: RawValue, multiplier: f64) -> Option<Precision> {
    let mut p = raw_precision(raw)?;
    if field.scale != 1.0 {
        p = p.times(Precision::of(field.scale)?);
    }
    if field.offset != 0.0 {
        p = p.plus(Precision::of(field.offset)?);
    }
    if field.unit.factor != 1.0 {
        p = p.times(Precision::of(field.unit.factor)?);
    }
    if multiplier != 1.0 {
        p = p.times(Precision::of(multiplier)?);
    }
    Some(p)
}

/// The engineering value (profile unit) of a canonical reading value, for range checks.
pub(crate) fn engineering(field: &Field, value: &Value) -> Option<f64> {
    value.as_f64().map(|v| v / field.unit.factor)
}

/// The meter-side engineering value (profile unit, secondary side) of a canonical value
/// that was multiplied by a transformer ratio `multiplier`.
pub(crate) fn engineering_secondary(field: &Field, value: &Value, multiplier: f64) -> Option<f64> {
    engineering(field, value).map(|v| v / multiplier)
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

    const SECONDARY: &str = r#"
[meter]
vendor = "Test"
model = "N2"
protocol = "modbus"
[modbus]
function = 3
order = "CDAB"
[[field]]
name = "current_l1"
register = 0
type = "u16"
scale = 0.01
unit = "A"
ratio = "ct"
category = "measurement"
grade = "L3"
[[field]]
name = "voltage_l1"
register = 1
type = "u16"
scale = 0.1
unit = "V"
ratio = "pt"
category = "measurement"
grade = "L2"
[[field]]
name = "energy_import"
register = 2
type = "u32"
unit = "kWh"
ratio = "ct_pt"
category = "measurement"
grade = "L3"
[[field]]
name = "volume_forward"
register = 10
type = "i32"
fraction_register = 12
unit = "m3"
category = "measurement"
grade = "L2"
"#;

    #[test]
    fn ratios_scale_current_voltage_and_energy() {
        let p = Profile::parse(Path::new("n2.toml"), SECONDARY).unwrap();
        let dev = DeviceId::new("m1").unwrap();
        let mut img = RegisterImage::new();
        // 5.00 A, 230.0 V, 12 kWh (low word first)
        img.insert(RegisterAddress(0), vec![500, 2300, 12, 0]);
        let ratios = Ratios {
            ct: 40.0,
            pt: 100.0,
        };
        let n = normalise_with(&p, &dev, 0, &img, &ratios);
        let v = |name: &str| {
            n.readings
                .iter()
                .find(|r| r.field.as_str() == name)
                .unwrap()
                .value
                .clone()
        };
        assert_eq!(v("current_l1"), Value::Float(5.0 * 40.0));
        assert_eq!(v("voltage_l1"), Value::Float(230.0 * 100.0));
        assert_eq!(v("energy_import"), Value::Float(12_000.0 * 4000.0));
        // Unity ratios: the same values as the meter shows, still floats.
        let n = normalise(&p, &dev, 0, &img);
        assert_eq!(n.readings[2].value, Value::Float(12_000.0));
    }

    #[test]
    fn a_combined_total_needs_both_parts() {
        let p = Profile::parse(Path::new("n2.toml"), SECONDARY).unwrap();
        let dev = DeviceId::new("m1").unwrap();
        let mut img = RegisterImage::new();
        img.insert(RegisterAddress(10), vec![0x0010, 0x0000]); // integer part 16 only
        let n = normalise(&p, &dev, 0, &img);
        assert!(n.missing.iter().any(|f| f.as_str() == "volume_forward"));
        // 16 + 0.25 (f32 0x3E800000, low word first)
        img.insert(RegisterAddress(12), vec![0x0000, 0x3E80]);
        let n = normalise(&p, &dev, 0, &img);
        let r = n
            .readings
            .iter()
            .find(|r| r.field.as_str() == "volume_forward")
            .unwrap();
        assert_eq!(r.value, Value::Float(16.25));
        assert_eq!(r.unit, Unit::CubicMetre);
    }

    /// Issue 11 item 6: an f32 reaches the reading as its shortest decimal, and scaled
    /// values (integer or float registers, × unit factor) carry no binary noise; exact
    /// conversions stay exact.
    #[test]
    fn values_keep_their_source_precision() {
        let p = profile();
        let dev = DeviceId::new("m1").unwrap();
        let f32_words = |x: f32| {
            let b = x.to_bits();
            [(b >> 16) as u16, b as u16]
        };
        let power = normalise_field(
            p.field("active_power").unwrap(),
            &dev,
            0,
            &f32_words(231.929_35),
        );
        assert_eq!(power.value.to_string(), "231929.35", "kW → W of an f32");
        let volts = |scale: &str, x: f32| {
            let text = PROFILE.replacen(
                "type = \"f32\"\nunit = \"kW\"",
                &format!("type = \"f32\"\nscale = {scale}\nunit = \"V\""),
                1,
            );
            let p = Profile::parse(Path::new("n1.toml"), &text).unwrap();
            normalise_field(p.field("active_power").unwrap(), &dev, 0, &f32_words(x)).value
        };
        assert_eq!(volts("1.0", 231.929_35).to_string(), "231.92935");
        // 3 × 0.1 is 0.30000000000000004 in binary arithmetic.
        let temp = normalise_field(p.field("temperature").unwrap(), &dev, 0, &[3]);
        assert_eq!(temp.value, Value::Float(0.3));
        // 35 × 0.01 kWh × 1000 is 350.00000000000006 Wh in binary arithmetic.
        let energy = normalise_field(p.field("energy_import").unwrap(), &dev, 0, &[35, 0]);
        assert_eq!(energy.value, Value::Float(350.0));
        // Exact unit conversion stays exact: 4 294 967 294 × 0.01 kWh.
        let energy = normalise_field(
            p.field("energy_import").unwrap(),
            &dev,
            0,
            &[0xFFFE, 0xFFFF],
        );
        assert_eq!(energy.value, Value::Float(42_949_672_940.0));
        assert_eq!(volts("0.001", 1.5).to_string(), "0.0015");
    }

    mod precision {
        use super::*;
        use proptest::prelude::*;

        fn sig_digits(shown: &str) -> usize {
            let s = shown.trim_start_matches('-');
            let digits: String = s.chars().filter(char::is_ascii_digit).collect();
            let digits = digits.trim_start_matches('0');
            if s.contains('.') {
                digits.len()
            } else {
                digits.trim_end_matches('0').len()
            }
        }

        proptest! {
            /// Issue 11 item 6: for a random f32 register and scale 1, 0.1, 0.01 or
            /// 0.001, the reading's shortest f64 display has no more significant digits
            /// than the f32's own shortest decimal.
            #[test]
            fn scaled_f32_readings_show_only_warranted_digits(
                bits in any::<u32>(),
                scale in prop_oneof![Just("1.0"), Just("0.1"), Just("0.01"), Just("0.001")],
            ) {
                let x = f32::from_bits(bits);
                prop_assume!(x.is_finite());
                let text = PROFILE.replacen(
                    "type = \"f32\"\nunit = \"kW\"",
                    &format!("type = \"f32\"\nscale = {scale}\nunit = \"V\""),
                    1,
                );
                let p = Profile::parse(Path::new("n1.toml"), &text).unwrap();
                let r = normalise_field(
                    p.field("active_power").unwrap(),
                    &DeviceId::new("m").unwrap(),
                    0,
                    &[(bits >> 16) as u16, bits as u16],
                );
                let shown = r.value.to_string();
                prop_assert!(
                    sig_digits(&shown) <= sig_digits(&x.to_string()),
                    "{} × {} shows {}", x, scale, shown
                );
            }

            /// Integer registers scaled by 0.1 .. 0.001 show at most their own digits.
            #[test]
            fn scaled_integer_readings_show_only_warranted_digits(raw in any::<u16>()) {
                let r = normalise_field(
                    profile().field("temperature").unwrap(),
                    &DeviceId::new("m").unwrap(),
                    0,
                    &[raw],
                );
                let shown = r.value.to_string();
                let source = (raw as i16).to_string();
                prop_assert!(sig_digits(&shown) <= sig_digits(&source), "{} shows {}", source, shown);
            }
        }
    }
}

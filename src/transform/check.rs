//! Quality checks: flag, never rewrite.
//!
//! [`assess`] is a pure function of a reading, its profile field and the previous good
//! value of the same counter. [`Checker`] holds that per-(device, field) memory for the
//! transform task. A reading already `bad` (sentinel, NaN) keeps its quality and does not
//! move the counter memory.

use std::collections::HashMap;

use super::normalise::engineering_secondary;
use crate::profile::{Counter, Field};
use crate::reading::{DeviceId, FieldName, Quality, QualityReason, Reading};

/// The quality a reading deserves, given the previous accepted value of a counter.
pub fn assess(field: &Field, reading: &Reading, previous: Option<f64>) -> Quality {
    assess_scaled(field, reading, previous, 1.0)
}

/// [`assess`] for a reading multiplied by a transformer ratio `multiplier`: the
/// profile's `range` describes the meter's own (secondary-side) value, so the range is
/// checked on the value divided by the multiplier.
pub fn assess_scaled(
    field: &Field,
    reading: &Reading,
    previous: Option<f64>,
    multiplier: f64,
) -> Quality {
    let mut q = reading.quality;
    if matches!(q, Quality::Bad(_)) {
        return q;
    }
    let Some(eng) = engineering_secondary(field, &reading.value, multiplier) else {
        return q;
    };
    if let Some((lo, hi)) = field.range {
        if eng < lo || eng > hi {
            q = q.worst(Quality::Bad(QualityReason::OutOfRange));
        }
    }
    if let (Counter::Monotonic { rollover }, Some(prev)) = (field.counter, previous) {
        let prev_eng = prev / field.unit.factor / multiplier;
        if eng < prev_eng {
            let wrapped = rollover.is_some_and(|r| prev_eng > 0.9 * r && eng < 0.1 * r);
            q = q.worst(Quality::Uncertain(if wrapped {
                QualityReason::CounterRollover
            } else {
                QualityReason::CounterBackwards
            }));
        }
    }
    q
}

/// Remembers the last accepted value of every monotonic counter.
#[derive(Debug, Default)]
pub struct Checker {
    last: HashMap<(DeviceId, FieldName), f64>,
}

impl Checker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the reading's quality; returns it for convenience.
    pub fn check(&mut self, field: &Field, reading: &mut Reading) -> Quality {
        self.check_scaled(field, reading, 1.0)
    }

    /// [`Checker::check`] for a reading multiplied by a transformer ratio.
    pub(crate) fn check_scaled(
        &mut self,
        field: &Field,
        reading: &mut Reading,
        multiplier: f64,
    ) -> Quality {
        let key = (reading.device.clone(), reading.field.clone());
        let previous = self.last.get(&key).copied();
        reading.quality = assess_scaled(field, reading, previous, multiplier);
        if matches!(field.counter, Counter::Monotonic { .. })
            && !matches!(reading.quality, Quality::Bad(_))
        {
            if let Some(v) = reading.value.as_f64() {
                // A reset meter is flagged once; later readings compare with the new base.
                self.last.insert(key, v);
            }
        }
        reading.quality
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;
    use crate::reading::{Unit, Value};
    use std::path::Path;

    const PROFILE: &str = r#"
[meter]
vendor = "T"
model = "C"
protocol = "modbus"
[modbus]
function = 3
[[field]]
name = "energy_import"
register = 0
type = "u32"
unit = "kWh"
counter = "monotonic"
rollover = 100000.0
range = [0.0, 100000.0]
category = "measurement"
grade = "L3"
[[field]]
name = "voltage_l1"
register = 2
type = "f32"
unit = "V"
range = [0.0, 300.0]
category = "measurement"
grade = "L2"
"#;

    fn reading(field: &str, v: f64, unit: Unit) -> Reading {
        let p = Profile::parse(Path::new("c.toml"), PROFILE).unwrap();
        let f = p.field(field).unwrap();
        Reading {
            device: DeviceId::new("d").unwrap(),
            field: f.name.clone(),
            value: Value::Float(v),
            unit,
            at_ms: 0,
            quality: Quality::Good,
            class: f.class,
        }
    }

    #[test]
    fn out_of_range_is_flagged_and_value_kept() {
        let p = Profile::parse(Path::new("c.toml"), PROFILE).unwrap();
        let f = p.field("voltage_l1").unwrap();
        let mut r = reading("voltage_l1", 400.0, Unit::Volt);
        let mut c = Checker::new();
        assert_eq!(c.check(f, &mut r), Quality::Bad(QualityReason::OutOfRange));
        assert_eq!(r.value, Value::Float(400.0));
    }

    #[test]
    fn counter_backwards_then_recovers() {
        let p = Profile::parse(Path::new("c.toml"), PROFILE).unwrap();
        let f = p.field("energy_import").unwrap();
        let mut c = Checker::new();
        let seq = [(1_000_000.0, Quality::Good), (1_500_000.0, Quality::Good)];
        for (v, q) in seq {
            assert_eq!(
                c.check(f, &mut reading("energy_import", v, Unit::WattHour)),
                q
            );
        }
        let mut back = reading("energy_import", 900_000.0, Unit::WattHour);
        assert_eq!(
            c.check(f, &mut back),
            Quality::Uncertain(QualityReason::CounterBackwards)
        );
        assert_eq!(back.value, Value::Float(900_000.0));
        assert_eq!(
            c.check(f, &mut reading("energy_import", 950_000.0, Unit::WattHour)),
            Quality::Good
        );
    }

    #[test]
    fn rollover_is_distinguished() {
        let p = Profile::parse(Path::new("c.toml"), PROFILE).unwrap();
        let f = p.field("energy_import").unwrap();
        let mut c = Checker::new();
        c.check(
            f,
            &mut reading("energy_import", 99_990_000.0, Unit::WattHour),
        );
        let q = c.check(f, &mut reading("energy_import", 5_000.0, Unit::WattHour));
        assert_eq!(q, Quality::Uncertain(QualityReason::CounterRollover));
    }

    #[test]
    fn bad_readings_do_not_move_the_counter() {
        let p = Profile::parse(Path::new("c.toml"), PROFILE).unwrap();
        let f = p.field("energy_import").unwrap();
        let mut c = Checker::new();
        c.check(
            f,
            &mut reading("energy_import", 2_000_000.0, Unit::WattHour),
        );
        let mut na = reading("energy_import", 0.0, Unit::WattHour);
        na.quality = Quality::Bad(QualityReason::NotAvailable);
        assert_eq!(
            c.check(f, &mut na),
            Quality::Bad(QualityReason::NotAvailable)
        );
        let q = c.check(
            f,
            &mut reading("energy_import", 2_000_100.0, Unit::WattHour),
        );
        assert_eq!(q, Quality::Good);
    }
}

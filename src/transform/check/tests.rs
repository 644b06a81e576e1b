use super::*;
use crate::profile::Profile;
use crate::reading::Unit;
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
max_rate = 0.5
range = [0.0, 100000.0]
category = "measurement"
grade = "L3"
[[field]]
name = "voltage_l1"
register = 2
type = "f32"
unit = "V"
range = [0.0, 300.0]
max_rate = 50.0
frozen_after = 3
category = "measurement"
grade = "L2"
"#;

fn reading(field: &str, v: f64, unit: Unit) -> Reading {
    reading_at(field, v, unit, 0)
}

fn reading_at(field: &str, v: f64, unit: Unit, at_ms: TimestampMs) -> Reading {
    let p = Profile::parse(Path::new("c.toml"), PROFILE).unwrap();
    let f = p.field(field).unwrap();
    Reading {
        device: DeviceId::new("d").unwrap(),
        field: f.name.clone(),
        value: Value::Float(v),
        unit,
        at_ms,
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

fn profile() -> Profile {
    Profile::parse(Path::new("c.toml"), PROFILE).unwrap()
}

/// Issue 11 item 6: a counter falling to near zero is a reset, told apart from a
/// misread backwards step and from a rollover; the reset value is the new base.
#[test]
fn counter_reset_is_distinguished_from_backwards_and_rollover() {
    let p = profile();
    let f = p.field("energy_import").unwrap();
    let mut c = Checker::new();
    let wh = |v: f64| reading("energy_import", v, Unit::WattHour);
    assert_eq!(c.check(f, &mut wh(50_000_000.0)), Quality::Good);
    let mut reset = wh(120_000.0); // 0.24 % of the previous 50 000 kWh
    assert_eq!(
        c.check(f, &mut reset),
        Quality::Uncertain(QualityReason::CounterReset)
    );
    assert_eq!(reset.value, Value::Float(120_000.0), "value kept as read");
    assert_eq!(c.check(f, &mut wh(130_000.0)), Quality::Good, "new base");
    // Falling to 60 % is a misread, not a reset.
    assert_eq!(c.check(f, &mut wh(140_000.0)), Quality::Good);
    assert_eq!(
        c.check(f, &mut wh(84_000.0)),
        Quality::Uncertain(QualityReason::CounterBackwards)
    );
    // Near the rollover a fall to near zero is a wrap, not a reset.
    c.check(f, &mut wh(99_000_000.0));
    assert_eq!(
        c.check(f, &mut wh(100.0)),
        Quality::Uncertain(QualityReason::CounterRollover)
    );
}

/// Issue 11 item 6: a counter without a rollover is reset below 1 % of its previous value.
#[test]
fn reset_without_rollover_uses_the_previous_value() {
    let text = PROFILE.replacen("rollover = 100000.0\n", "", 1);
    let p = Profile::parse(Path::new("c.toml"), &text).unwrap();
    let f = p.field("energy_import").unwrap();
    let mut c = Checker::new();
    c.check(
        f,
        &mut reading("energy_import", 2_000_000.0, Unit::WattHour),
    );
    assert_eq!(
        c.check(f, &mut reading("energy_import", 19_000.0, Unit::WattHour)),
        Quality::Uncertain(QualityReason::CounterReset)
    );
    c.check(
        f,
        &mut reading("energy_import", 2_000_000.0, Unit::WattHour),
    );
    assert_eq!(
        c.check(f, &mut reading("energy_import", 21_000.0, Unit::WattHour)),
        Quality::Uncertain(QualityReason::CounterBackwards),
        "1.05 % is still a misread"
    );
}

/// Issue 11 item 6: a gauge changing faster than `max_rate` per second since the last
/// good reading is a spike; the spike does not become the base.
#[test]
fn gauge_spike_is_flagged_against_the_last_good_reading() {
    let p = profile();
    let f = p.field("voltage_l1").unwrap();
    let mut c = Checker::new();
    let mut at =
        |v: f64, ms: TimestampMs| c.check(f, &mut reading_at("voltage_l1", v, Unit::Volt, ms));
    assert_eq!(at(230.0, 0), Quality::Good);
    assert_eq!(at(240.0, 1_000), Quality::Good, "10 V/s is plausible");
    let spike = Quality::Uncertain(QualityReason::Spike);
    assert_eq!(at(180.0, 2_000), spike, "60 V/s falling");
    assert_eq!(
        at(235.0, 2_200),
        Quality::Good,
        "judged against the last good 240 V, not the spike"
    );
    // A real step stops being a spike once enough time has passed.
    assert_eq!(at(290.0, 2_400), spike);
    assert_eq!(at(290.0, 3_400), Quality::Good, "55 V in 1.2 s");
}

/// Issue 11 item 6: for a counter, `max_rate` bounds the increment per second.
#[test]
fn counter_spike_is_an_increment_too_fast() {
    let p = profile();
    let f = p.field("energy_import").unwrap();
    let mut c = Checker::new();
    let mut at = |wh: f64, ms: TimestampMs| {
        c.check(f, &mut reading_at("energy_import", wh, Unit::WattHour, ms))
    };
    assert_eq!(at(1_000_000.0, 0), Quality::Good);
    assert_eq!(at(1_000_400.0, 1_000), Quality::Good, "0.4 kWh/s");
    assert_eq!(
        at(1_100_000.0, 2_000),
        Quality::Uncertain(QualityReason::Spike),
        "a 100 kWh jump in one second"
    );
    assert_eq!(
        at(1_000_900.0, 3_000),
        Quality::Good,
        "judged against 1 000 400 Wh"
    );
}

/// Issue 11 item 6: the N-th identical value in a row and those after it are frozen;
/// any change ends the run.
#[test]
fn frozen_values_are_flagged_from_the_nth_repeat() {
    let p = profile();
    let f = p.field("voltage_l1").unwrap();
    let mut c = Checker::new();
    let frozen = Quality::Uncertain(QualityReason::Frozen);
    let got: Vec<Quality> = [230.1, 230.1, 230.1, 230.1, 230.2, 230.2]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            c.check(
                f,
                &mut reading_at("voltage_l1", *v, Unit::Volt, i as i64 * 1000),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            Quality::Good,
            Quality::Good,
            frozen,
            frozen,
            Quality::Good,
            Quality::Good
        ]
    );
    // Another device's run is its own.
    let mut other = reading_at("voltage_l1", 230.2, Unit::Volt, 6_000);
    other.device = DeviceId::new("e").unwrap();
    assert_eq!(c.check(f, &mut other), Quality::Good);
}

mod raw_values {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Issue 11 item 6: no check (range, counter backwards/reset/rollover, spike,
        /// frozen) ever rewrites a reading's value or timestamp.
        #[test]
        fn checks_never_rewrite_values(
            steps in proptest::collection::vec((0usize..2, prop_oneof![
                (0.0f64..120_000_000.0),
                Just(0.0),
                Just(230.0),
            ], 0i64..5_000), 1..60),
        ) {
            let p = profile();
            let mut c = Checker::new();
            let mut at_ms = 0;
            for (which, v, dt) in steps {
                at_ms += dt;
                let (name, unit, v) = match which {
                    0 => ("energy_import", Unit::WattHour, v),
                    _ => ("voltage_l1", Unit::Volt, v % 320.0),
                };
                let f = p.field(name).unwrap();
                let mut r = reading_at(name, v, unit, at_ms);
                let before = r.clone();
                let q = c.check(f, &mut r);
                prop_assert_eq!(&r.value, &before.value);
                prop_assert_eq!(r.at_ms, before.at_ms);
                prop_assert_eq!(&r.device, &before.device);
                prop_assert_eq!(r.unit, before.unit);
                prop_assert_eq!(r.quality, q);
            }
        }
    }
}

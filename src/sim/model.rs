//! How a simulated meter's values evolve from one snapshot to the next.
//!
//! Each meter has a small load state (current, power factor, water flow, water
//! temperature) that random-walks inside plausible bounds; every field is derived
//! from it by its canonical unit, so powers stay roughly consistent with volts ×
//! amps and energy counters advance at the rate the powers imply:
//!
//! | canonical unit | value |
//! |---|---|
//! | V | 230 (line-to-line names such as `voltage_l1_l2`: 400) ±1%; the middle of `range` when the nominal is outside it |
//! | A | 0.5–20 |
//! | W, var, VA | from 230 V × current × power factor, × phases for totals |
//! | 1 (power factor names) | 0.85–1.0 |
//! | Hz | 50 ± 0.05 |
//! | Wh, varh, m3, s, and any `monotonic` field | a counter, strictly increasing per snapshot |
//! | m3/h | 0–3 |
//! | degC | 5–30 |
//!
//! Identifiers (category `identifier`) are fixed per unit (10 000 000 + unit id, else
//! 1 000 + unit id, else the unit id, whichever first fits the field's type and range); status words and bits are mostly 0.
//! Every value is fitted into its field's limits ([`fit`]) before it is served.
//!
//! Draws come from a generator seeded by (seed, unit id) and happen in the same order
//! for every snapshot, so the sequence of gauge values is reproducible. Counters
//! integrate over the elapsed time between snapshots, and take the smallest step the
//! register type can show when that increment would not be visible.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::map::{fit, limits};
use crate::profile::{Counter, Field, FieldType, Profile};
use crate::reading::Unit as U;
use crate::reading::{Category, UnitId};

/// Nominal phase-to-neutral and line-to-line voltages (V).
const NOMINAL_VOLTS: f64 = 230.0;
const NOMINAL_LINE_VOLTS: f64 = 400.0;
/// Load bounds.
const CURRENT_AMPS: (f64, f64) = (0.5, 20.0);
const POWER_FACTOR: (f64, f64) = (0.85, 1.0);
const FLOW_M3_PER_H: (f64, f64) = (0.0, 3.0);
const WATER_DEG_C: (f64, f64) = (5.0, 30.0);
/// Chance per snapshot that a status bit or word is non-zero.
const STATUS_CHANCE: f64 = 0.01;
/// Doublings of a counter's step before it is considered stuck at its type's limit.
const MAX_DOUBLINGS: usize = 64;

/// What a counter integrates.
#[derive(Debug, Clone, Copy)]
enum Rate {
    ActiveEnergy,
    ExportEnergy,
    ReactiveEnergy,
    Volume,
    Clock,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Nominal in the profile's unit.
    Voltage(f64),
    Current,
    ActivePower,
    ReactivePower,
    ApparentPower,
    PowerFactor,
    Frequency,
    Flow,
    Temperature,
    Pressure,
    Percent,
    Counter(Rate),
    Identifier,
    StatusWord,
    Flag,
    Other,
}

#[derive(Debug, Clone)]
struct FieldModel {
    kind: Kind,
    /// Fixed per field: phases and channels differ a little from each other.
    skew: f64,
    /// Multiplier for totals of a three-phase meter.
    phases: f64,
    /// The value last served (counters only).
    last: Option<f64>,
}

/// The meter-wide state fields are derived from.
#[derive(Debug, Clone)]
struct Load {
    current: f64,
    power_factor: f64,
    flow: f64,
    temperature: f64,
}

/// Value evolution of one simulated meter.
#[derive(Debug)]
pub(super) struct MeterModel {
    rng: StdRng,
    unit: UnitId,
    load: Load,
    fields: Vec<FieldModel>,
}

impl MeterModel {
    pub(super) fn new(profile: &Profile, seed: u64, unit: UnitId) -> Self {
        let mut rng =
            StdRng::seed_from_u64(seed ^ u64::from(unit.0).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let three_phase = profile
            .fields
            .iter()
            .any(|f| f.name.as_str().contains("l3"));
        let fields = profile
            .fields
            .iter()
            .map(|f| {
                let per_phase = ["l1", "l2", "l3"]
                    .iter()
                    .any(|p| f.name.as_str().contains(p));
                FieldModel {
                    kind: classify(f),
                    skew: rng.gen_range(0.95..1.05),
                    phases: if three_phase && !per_phase { 3.0 } else { 1.0 },
                    last: None,
                }
            })
            .collect();
        let load = Load {
            current: rng.gen_range(2.0..10.0),
            power_factor: rng.gen_range(0.9..0.99),
            flow: rng.gen_range(0.2..2.0),
            temperature: rng.gen_range(10.0..20.0),
        };
        Self {
            rng,
            unit,
            load,
            fields,
        }
    }

    /// Evolves the values by one snapshot, `elapsed` after the previous one, and
    /// returns each field's encoded registers (in profile field order).
    pub(super) fn next(&mut self, profile: &Profile, elapsed: Duration) -> Vec<Vec<u16>> {
        self.walk();
        let hours = elapsed.as_secs_f64() / 3600.0;
        let mut out = Vec::with_capacity(profile.fields.len());
        for (f, m) in profile.fields.iter().zip(self.fields.iter_mut()) {
            let words = match m.kind {
                Kind::Counter(rate) => {
                    let (words, got) = match m.last {
                        None => fit(f, counter_start(f, rate, &mut self.rng)),
                        Some(prev) => {
                            let per_hour = rate_per_hour(rate, &self.load, m.phases);
                            advance(f, prev, per_hour * hours / f.unit.factor)
                        }
                    };
                    m.last = Some(got);
                    words
                }
                kind => {
                    let target = gauge(kind, f, m, &self.load, self.unit, &mut self.rng);
                    fit(f, target).0
                }
            };
            out.push(words);
        }
        out
    }

    fn walk(&mut self) {
        let r = &mut self.rng;
        let l = &mut self.load;
        l.current = (l.current + r.gen_range(-0.3..=0.3)).clamp(CURRENT_AMPS.0, CURRENT_AMPS.1);
        l.power_factor =
            (l.power_factor + r.gen_range(-0.005..=0.005)).clamp(POWER_FACTOR.0, POWER_FACTOR.1);
        l.flow = (l.flow + r.gen_range(-0.1..=0.1)).clamp(FLOW_M3_PER_H.0, FLOW_M3_PER_H.1);
        l.temperature =
            (l.temperature + r.gen_range(-0.05..=0.05)).clamp(WATER_DEG_C.0, WATER_DEG_C.1);
    }
}

fn classify(f: &Field) -> Kind {
    let name = f.name.as_str().to_ascii_lowercase();
    match (f.ty, f.class.category) {
        (FieldType::Bit(_), _) => return Kind::Flag,
        (_, Category::Identifier) => return Kind::Identifier,
        (_, Category::Status | Category::Alarm) => return Kind::StatusWord,
        _ => {}
    }
    let monotonic = matches!(f.counter, Counter::Monotonic { .. });
    match f.unit.canonical {
        U::WattHour if name.contains("export") => Kind::Counter(Rate::ExportEnergy),
        U::WattHour => Kind::Counter(Rate::ActiveEnergy),
        U::VarHour => Kind::Counter(Rate::ReactiveEnergy),
        U::CubicMetre => Kind::Counter(Rate::Volume),
        U::Second => Kind::Counter(Rate::Clock),
        _ if monotonic => Kind::Counter(Rate::Clock),
        U::Volt => Kind::Voltage(nominal_volts(f, &name)),
        U::Ampere => Kind::Current,
        U::Watt => Kind::ActivePower,
        U::Var => Kind::ReactivePower,
        U::VoltAmpere => Kind::ApparentPower,
        U::Hertz => Kind::Frequency,
        U::CubicMetrePerHour => Kind::Flow,
        U::Celsius => Kind::Temperature,
        U::Pascal => Kind::Pressure,
        U::Percent => Kind::Percent,
        U::One
            if ["power_factor", "pf", "cos_phi", "cosphi"]
                .iter()
                .any(|p| name.contains(p)) =>
        {
            Kind::PowerFactor
        }
        U::One => Kind::Other,
    }
}

/// 230 V (400 V for line-to-line names) in the profile's unit, or the middle of the
/// field's range when that nominal is outside it.
fn nominal_volts(f: &Field, name: &str) -> f64 {
    let line_to_line = [
        "l1_l2", "l2_l3", "l3_l1", "l1l2", "l2l3", "l3l1", "l12", "l23", "l31", "_ll",
    ]
    .iter()
    .any(|p| name.contains(p));
    let canonical = if line_to_line {
        NOMINAL_LINE_VOLTS
    } else {
        NOMINAL_VOLTS
    };
    let nominal = canonical / f.unit.factor;
    match f.range {
        Some((lo, hi)) if !(lo..=hi).contains(&nominal) => lo + (hi - lo) / 2.0,
        _ => nominal,
    }
}

/// A gauge's next value in the profile's unit (before fitting into its limits).
fn gauge(
    kind: Kind,
    f: &Field,
    m: &FieldModel,
    load: &Load,
    unit: UnitId,
    rng: &mut StdRng,
) -> f64 {
    let mut noise = |p: f64| 1.0 + rng.gen_range(-p..=p);
    let amps = (load.current * m.skew).clamp(CURRENT_AMPS.0, CURRENT_AMPS.1);
    let sin_phi = (1.0 - load.power_factor * load.power_factor)
        .max(0.0)
        .sqrt();
    let canonical = match kind {
        Kind::Voltage(nominal) => return nominal * noise(0.01),
        Kind::Current => (amps * noise(0.01)).clamp(CURRENT_AMPS.0, CURRENT_AMPS.1),
        Kind::ActivePower => NOMINAL_VOLTS * amps * load.power_factor * m.phases * noise(0.01),
        Kind::ReactivePower => NOMINAL_VOLTS * amps * sin_phi * m.phases * noise(0.01),
        Kind::ApparentPower => NOMINAL_VOLTS * amps * m.phases * noise(0.01),
        Kind::PowerFactor => {
            (load.power_factor * noise(0.002)).clamp(POWER_FACTOR.0, POWER_FACTOR.1)
        }
        Kind::Frequency => 50.0 * noise(0.001),
        Kind::Flow => (load.flow * m.skew).clamp(FLOW_M3_PER_H.0, FLOW_M3_PER_H.1),
        Kind::Temperature => (load.temperature * noise(0.005)).clamp(WATER_DEG_C.0, WATER_DEG_C.1),
        Kind::Pressure => 300_000.0 * m.skew * noise(0.02),
        Kind::Percent => 50.0 * m.skew * noise(0.05),
        Kind::Identifier => {
            // The widest id that fits the field: a serial number, a short code, or the
            // unit id itself (a meter's bus address).
            let (lo, hi) = limits(f);
            let u = f64::from(unit.0);
            return [10_000_000.0 + u, 1_000.0 + u, u]
                .into_iter()
                .find(|id| (lo..=hi).contains(id))
                .unwrap_or(u);
        }
        Kind::StatusWord => {
            let raw = if rng.gen_bool(STATUS_CHANCE) {
                f64::from(1u16 << rng.gen_range(0..4))
            } else {
                0.0
            };
            return raw * f.scale + f.offset;
        }
        Kind::Flag => {
            let raw = if rng.gen_bool(STATUS_CHANCE) {
                1.0
            } else {
                0.0
            };
            return raw * f.scale + f.offset;
        }
        Kind::Other => {
            let jitter = rng.gen_range(-0.05..=0.05);
            return match f.range {
                Some((lo, hi)) => lo + (hi - lo) * (0.5 + jitter),
                None => m.skew,
            };
        }
        Kind::Counter(_) => return m.last.unwrap_or_default(),
    };
    canonical / f.unit.factor
}

/// A counter's first value: plausible for an installed meter, and in the lower
/// quarter of what the field can hold.
fn counter_start(f: &Field, rate: Rate, rng: &mut StdRng) -> f64 {
    let canonical = match rate {
        Rate::ActiveEnergy => rng.gen_range(1e6..5e7),
        Rate::ExportEnergy => rng.gen_range(1e4..1e6),
        Rate::ReactiveEnergy => rng.gen_range(1e5..1e7),
        Rate::Volume => rng.gen_range(100.0..5_000.0),
        Rate::Clock => rng.gen_range(0.0..1e6),
    };
    let (lo, hi) = limits(f);
    (canonical / f.unit.factor).clamp(lo, lo + (hi - lo) / 4.0)
}

/// Canonical units per hour a counter advances at under the current load.
fn rate_per_hour(rate: Rate, load: &Load, phases: f64) -> f64 {
    let va = NOMINAL_VOLTS * load.current * phases;
    match rate {
        Rate::ActiveEnergy => va * load.power_factor,
        Rate::ExportEnergy => 0.02 * va * load.power_factor,
        Rate::ReactiveEnergy => va * (1.0 - load.power_factor.powi(2)).max(0.0).sqrt(),
        Rate::Volume => load.flow,
        Rate::Clock => 3_600.0,
    }
}

/// Advances a counter from `prev` by at least `increment` (profile unit) and by at
/// least the smallest step its registers can show; wraps at the rollover or the top
/// of its limits.
fn advance(f: &Field, prev: f64, increment: f64) -> (Vec<u16>, f64) {
    let (lo, hi) = limits(f);
    let cap = match f.counter {
        Counter::Monotonic { rollover: Some(r) } => hi.min(r),
        _ => hi,
    };
    let floor = f.scale.abs() * 1e-6;
    let smallest = match f.ty {
        // A combined total's f32 fraction resolves far below one integer step.
        _ if f.fraction.is_some() => f.scale.abs() * 1e-3,
        FieldType::F32 => prev.abs() * f64::from(f32::EPSILON) / 2.0,
        FieldType::F64 => prev.abs() * f64::EPSILON / 2.0,
        _ => f.scale.abs() / 2.0,
    };
    let mut step = increment.max(smallest).max(floor);
    for _ in 0..MAX_DOUBLINGS {
        let next = prev + step;
        if next > cap {
            return fit(f, lo + (next - cap));
        }
        let (words, got) = fit(f, next);
        if got > prev {
            return (words, got);
        }
        step *= 2.0;
    }
    fit(f, prev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::fixtures::test_profile;

    #[test]
    fn fields_are_classified_by_unit_and_category() {
        let p = test_profile();
        let kind = |name: &str| classify(p.field(name).expect("fixture field"));
        assert!(matches!(kind("voltage_l1"), Kind::Voltage(v) if v == 230.0));
        assert!(matches!(kind("voltage_l1_l2"), Kind::Voltage(v) if v == 400.0));
        assert!(matches!(kind("aux_voltage"), Kind::Voltage(v) if v == 24.0));
        assert!(matches!(kind("power_factor"), Kind::PowerFactor));
        assert!(matches!(
            kind("energy_import"),
            Kind::Counter(Rate::ActiveEnergy)
        ));
        assert!(matches!(
            kind("volume_forward"),
            Kind::Counter(Rate::Volume)
        ));
        assert!(matches!(kind("meter_serial"), Kind::Identifier));
        assert!(matches!(kind("tamper"), Kind::Flag));
        assert!(matches!(kind("status_word"), Kind::StatusWord));
    }

    #[test]
    fn counters_take_a_visible_step_even_without_elapsed_time() {
        let p = test_profile();
        let energy = p.field("energy_import").expect("fixture field");
        let (_, first) = fit(energy, 1234.5);
        let (_, second) = advance(energy, first, 0.0);
        assert!((second - first - 0.01).abs() < 1e-9, "{first} -> {second}");
        let reactive = p.field("energy_reactive").expect("fixture field");
        let (_, a) = fit(reactive, 98_765.4);
        let (_, b) = advance(reactive, a, 1e-9);
        assert!(b > a && b - a < 0.02, "{a} -> {b}");
    }

    #[test]
    fn same_seed_and_unit_give_the_same_sequence() {
        let p = test_profile();
        let run = |seed, unit| {
            let mut m = MeterModel::new(&p, seed, UnitId(unit));
            (0..50)
                .map(|_| m.next(&p, Duration::from_secs(1)))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7, 1), run(7, 1));
        assert_ne!(run(7, 1), run(7, 2));
        assert_ne!(run(7, 1), run(8, 1));
    }
}

//! The records a simulated gateway seals: what a minimised readings batch of a county
//! gateway holds (keyed pseudonyms as subjects, canonical units, good quality), with values
//! that move like meter values so the compressor sees realistic entropy.

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::reading::{Quality, Record, Unit, Value};

/// Readings fields a meter can give, in `--fields` order: name, unit, typical value and
/// how far one reading strays from it.
const FIELDS: [(&str, Unit, f64, f64); 12] = [
    ("voltage_l1", Unit::Volt, 230.0, 4.0),
    ("current_l1", Unit::Ampere, 12.0, 6.0),
    ("active_power", Unit::Watt, 2_700.0, 1_500.0),
    ("energy_import", Unit::WattHour, 4_200_000.0, 0.0),
    ("frequency", Unit::Hertz, 50.0, 0.05),
    ("power_factor", Unit::Percent, 95.0, 3.0),
    ("voltage_l2", Unit::Volt, 230.0, 4.0),
    ("voltage_l3", Unit::Volt, 230.0, 4.0),
    ("current_l2", Unit::Ampere, 12.0, 6.0),
    ("current_l3", Unit::Ampere, 12.0, 6.0),
    ("reactive_power", Unit::Var, 300.0, 200.0),
    ("apparent_power", Unit::VoltAmpere, 2_900.0, 1_500.0),
];

/// Most `--fields` a meter can have.
pub(super) const MAX_FIELDS: u32 = FIELDS.len() as u32;

/// The pseudonym of meter `m` of gateway `gateway`: `p-` + 32 hex digits, the shape the
/// gateway's keyed pseudonyms have.
pub(super) fn subject(gateway: &str, m: u32) -> String {
    let h = Sha256::new()
        .chain_update(gateway.as_bytes())
        .chain_update(m.to_be_bytes())
        .finalize();
    format!("p-{}", hex::encode(&h[..16]))
}

/// One batch: for each of `readings` instants `interval_ms` apart ending at `end_ms`, one
/// record per meter and field.
pub(super) fn batch(
    subjects: &[String],
    fields: u32,
    readings: u64,
    interval_ms: i64,
    end_ms: i64,
    rng: &mut impl Rng,
) -> Vec<Record> {
    let n = usize::try_from(fields)
        .unwrap_or(FIELDS.len())
        .min(FIELDS.len());
    let per_reading = subjects.len() * n;
    let mut out = Vec::with_capacity(per_reading * usize::try_from(readings).unwrap_or(1));
    for r in 0..readings {
        let back = i64::try_from(readings - 1 - r).unwrap_or(0);
        let at_ms = end_ms - back * interval_ms;
        for s in subjects {
            for (name, unit, typical, spread) in &FIELDS[..n] {
                let value = if *spread == 0.0 {
                    // A counter: grows with time.
                    typical + (at_ms % 100_000_000) as f64 / 1000.0
                } else {
                    typical + rng.gen_range(-*spread..*spread)
                };
                out.push(Record {
                    subject: s.clone(),
                    field: (*name).to_owned(),
                    value: Value::Float((value * 100.0).round() / 100.0),
                    unit: *unit,
                    at_ms,
                    quality: Quality::Good,
                    tags: Vec::new(),
                    window: None,
                    epoch: 0,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_batch_has_one_record_per_meter_field_and_reading_all_distinct() {
        let subjects: Vec<String> = (0..3).map(|m| subject("gw-00001", m)).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let b = batch(&subjects, 6, 4, 1000, 10_000, &mut rng);
        assert_eq!(b.len(), 3 * 6 * 4);
        let keys: std::collections::HashSet<_> =
            b.iter().map(|r| (&r.subject, &r.field, r.at_ms)).collect();
        assert_eq!(keys.len(), b.len());
        assert_eq!(b.first().map(|r| r.at_ms), Some(7_000));
        assert_eq!(b.last().map(|r| r.at_ms), Some(10_000));
        assert!(subjects[0].starts_with("p-") && subjects[0].len() == 34);
        assert_ne!(subject("gw-00001", 0), subject("gw-00002", 0));
    }
}

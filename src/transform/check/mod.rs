//! Quality checks: flag, never rewrite.
//!
//! [`assess`] is a pure function of a reading, its profile field and the previous
//! accepted value of the same counter. [`Checker`] holds the per-(device, field) memory
//! the stateful checks need for the transform task. Every check only sets the reading's
//! quality (the worst applies; the first reason wins a tie): the value and its timestamp
//! are never touched. The rules, in the field's profile unit on the meter side (a
//! transformer ratio divided back out):
//!
//! - **Range**: outside the profile's `range` → `bad(out_of_range)`.
//! - **Counters** (`counter = "monotonic"`) that fall below the previous accepted value:
//!   - *rollover*: the previous value was above 90 % of the declared `rollover` and the
//!     new one is below 10 % of it → `uncertain(counter_rollover)`;
//!   - *reset*: otherwise, the new value is below 1 % of the previous one (fell to near
//!     zero): the meter was replaced or reset → `uncertain(counter_reset)`;
//!   - *backwards*: any other decrease, a misread or a wrong register
//!     → `uncertain(counter_backwards)`.
//!
//!   The flagged value becomes the new base, so a reset is flagged once and later
//!   readings count on from it.
//! - **Spikes** (`max_rate`): the change since the previous good reading, per second of
//!   reading time, exceeds `max_rate` → `uncertain(spike)`; for a counter the increment
//!   counts (decreases are the counter rules' business). A spike does not become the
//!   base: the next reading is judged against the last good one, so a single misread
//!   flags one reading, and a real step stops being flagged once enough time has passed
//!   for it to be plausible. Readings not later than the base are not judged.
//! - **Frozen values** (`frozen_after = N`, gauges that always jitter such as voltage
//!   and frequency): the N-th identical value in a row and every one after it
//!   → `uncertain(frozen)`.
//!
//! A reading already `bad` (sentinel, NaN) keeps its quality and moves no memory.

use std::collections::HashMap;

use super::normalise::engineering_secondary;
use crate::profile::{Counter, Field};
use crate::reading::{DeviceId, FieldName, Quality, QualityReason, Reading, TimestampMs, Value};

/// A counter falling below this share of its previous value was reset or replaced
/// rather than misread.
const RESET_FRACTION: f64 = 0.01;

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
            let reset = eng < RESET_FRACTION * prev_eng;
            q = q.worst(Quality::Uncertain(if wrapped {
                QualityReason::CounterRollover
            } else if reset {
                QualityReason::CounterReset
            } else {
                QualityReason::CounterBackwards
            }));
        }
    }
    q
}

/// Whether `reading` changed faster than the field's `max_rate` since `base` (the last
/// good reading's canonical value and time).
fn is_spike(
    field: &Field,
    reading: &Reading,
    base: Option<(f64, TimestampMs)>,
    multiplier: f64,
) -> bool {
    let (Some(max_rate), Some((prev, prev_at)), Some(v)) =
        (field.max_rate, base, reading.value.as_f64())
    else {
        return false;
    };
    let elapsed_s = (reading.at_ms.saturating_sub(prev_at)) as f64 / 1000.0;
    if elapsed_s <= 0.0 {
        return false;
    }
    let change = (v - prev) / field.unit.factor / multiplier;
    let change = match field.counter {
        Counter::Monotonic { .. } => change,
        Counter::None => change.abs(),
    };
    change / elapsed_s > max_rate
}

/// What the stateful checks remember of one (device, field).
#[derive(Debug, Default)]
struct History {
    /// The last reading neither bad nor a spike: canonical value and time.
    base: Option<(f64, TimestampMs)>,
    /// The latest value and how many readings in a row carried it.
    run: Option<(Value, u32)>,
}

/// Remembers, per (device, field), what the counter, spike and frozen checks compare with.
#[derive(Debug, Default)]
pub struct Checker {
    history: HashMap<(DeviceId, FieldName), History>,
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
        let stateful = matches!(field.counter, Counter::Monotonic { .. })
            || field.max_rate.is_some()
            || field.frozen_after.is_some();
        if !stateful {
            reading.quality = assess_scaled(field, reading, None, multiplier);
            return reading.quality;
        }
        let key = (reading.device.clone(), reading.field.clone());
        let h = self.history.entry(key).or_default();
        let previous = match field.counter {
            Counter::Monotonic { .. } => h.base.map(|(v, _)| v),
            Counter::None => None,
        };
        let mut q = assess_scaled(field, reading, previous, multiplier);
        if matches!(q, Quality::Bad(_)) {
            reading.quality = q;
            return q;
        }
        let spike = is_spike(field, reading, h.base, multiplier);
        if spike {
            q = q.worst(Quality::Uncertain(QualityReason::Spike));
        }
        if let Some(n) = field.frozen_after {
            let same = match &mut h.run {
                Some((v, count)) if *v == reading.value => {
                    *count = count.saturating_add(1);
                    *count
                }
                run => {
                    *run = Some((reading.value.clone(), 1));
                    1
                }
            };
            if same >= n {
                q = q.worst(Quality::Uncertain(QualityReason::Frozen));
            }
        }
        if !spike {
            if let Some(v) = reading.value.as_f64() {
                h.base = Some((v, reading.at_ms));
            }
        }
        reading.quality = q;
        q
    }
}

#[cfg(test)]
mod tests;

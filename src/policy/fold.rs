//! Window accumulators: what a window has folded so far, per device and per area.

use super::rule::Across;
use crate::reading::{AggFn, Quality, QualityReason, Value};

/// Largest magnitude at which every integer is exact in an f64.
const EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// `x` as an integer value when the inputs were integers and `x` is one, else a float.
pub(crate) fn number(x: f64, all_int: bool) -> Value {
    if all_int && x.fract() == 0.0 && x.abs() < EXACT_INT {
        Value::Int(x as i64)
    } else {
        Value::Float(x)
    }
}

/// One open window of one device, field and rule.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Acc {
    pub start_ms: i64,
    pub end_ms: i64,
    sum: f64,
    min: f64,
    max: f64,
    last: f64,
    last_at: i64,
    pub samples: u32,
    all_int: bool,
    pub quality: Quality,
    /// The window began before this engine saw its device: the first window of a device
    /// after a fresh start (or after the device first answered) covers only part of it.
    pub partial: bool,
}

impl Acc {
    pub(crate) fn new(start_ms: i64, end_ms: i64) -> Self {
        Self {
            start_ms,
            end_ms,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            last: 0.0,
            last_at: i64::MIN,
            samples: 0,
            all_int: true,
            quality: Quality::Good,
            partial: false,
        }
    }

    /// Folds one sample (for `delta`: its increment).
    pub(crate) fn fold(&mut self, x: f64, is_int: bool, at_ms: i64, quality: Quality) {
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        if at_ms >= self.last_at {
            self.last = x;
            self.last_at = at_ms;
        }
        self.samples += 1;
        self.all_int &= is_int;
        self.quality = self.quality.worst(quality);
    }

    /// A counter reset inside the window: its delta is uncertain.
    pub(crate) fn mark_reset(&mut self) {
        self.quality = self
            .quality
            .worst(Quality::Uncertain(QualityReason::CounterBackwards));
    }

    /// The window's value under `f` as a float.
    pub(crate) fn result(&self, f: AggFn) -> f64 {
        match f {
            AggFn::Sum | AggFn::Delta => self.sum,
            AggFn::Mean => self.sum / f64::from(self.samples.max(1)),
            AggFn::Min => self.min,
            AggFn::Max => self.max,
            AggFn::Last => self.last,
        }
    }

    /// Whether `result(f)` is an integer quantity (integer inputs, not a mean).
    pub(crate) fn is_int(&self, f: AggFn) -> bool {
        self.all_int && f != AggFn::Mean
    }

    pub(crate) fn value(&self, f: AggFn) -> Value {
        number(self.result(f), self.is_int(f))
    }
}

/// One open area window of one rule and field: per-device window values combined.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct GroupAcc {
    pub end_ms: i64,
    across: Across,
    values: Acc,
    /// Samples covered by all contributing device windows.
    pub samples: u32,
    pub partial: bool,
}

impl GroupAcc {
    pub(crate) fn new(start_ms: i64, end_ms: i64, across: Across) -> Self {
        Self {
            end_ms,
            across,
            values: Acc::new(start_ms, end_ms),
            samples: 0,
            partial: false,
        }
    }

    /// Adds one device's window value.
    pub(crate) fn add(&mut self, device: &Acc, f: AggFn, partial: bool) {
        self.values.fold(
            device.result(f),
            device.is_int(f),
            device.start_ms,
            device.quality,
        );
        self.samples += device.samples;
        self.partial |= partial;
    }

    pub(crate) fn devices(&self) -> u32 {
        self.values.samples
    }

    pub(crate) fn quality(&self) -> Quality {
        self.values.quality
    }

    pub(crate) fn value(&self) -> Value {
        let f = match self.across {
            Across::Sum => AggFn::Sum,
            Across::Mean => AggFn::Mean,
            Across::Min => AggFn::Min,
            Across::Max => AggFn::Max,
        };
        self.values.value(f)
    }
}

/// The increment of a counter from `prev` to `v` (see the module docs): the increment
/// and whether it was a reset.
pub(crate) fn increment(prev: f64, v: f64, rollover: Option<f64>) -> (f64, bool) {
    if v >= prev {
        return (v - prev, false);
    }
    match rollover {
        Some(r) if prev > 0.9 * r && v < 0.1 * r => (r - prev + v, false),
        _ => (v, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increments_handle_rollover_and_reset() {
        assert_eq!(increment(10.0, 15.0, None), (5.0, false));
        assert_eq!(increment(99_990.0, 5.0, Some(100_000.0)), (15.0, false));
        assert_eq!(increment(500.0, 3.0, Some(100_000.0)), (3.0, true));
        assert_eq!(increment(500.0, 3.0, None), (3.0, true));
    }

    #[test]
    fn integer_inputs_stay_integers_except_means() {
        let mut a = Acc::new(0, 10);
        a.fold(3.0, true, 1, Quality::Good);
        a.fold(4.0, true, 2, Quality::Good);
        assert_eq!(a.value(AggFn::Sum), Value::Int(7));
        assert_eq!(a.value(AggFn::Mean), Value::Float(3.5));
        assert_eq!(a.value(AggFn::Last), Value::Int(4));
        a.fold(0.5, false, 0, Quality::Good);
        assert_eq!(a.value(AggFn::Sum), Value::Float(7.5));
        assert_eq!(a.value(AggFn::Last), Value::Float(4.0), "last is by time");
    }
}

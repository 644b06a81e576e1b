//! Generalised values: rounding to a step and bucketing.

use super::fold::number;
use super::rule::ValueStep;
use crate::reading::Value;

/// Decimal places of a step written in a file (`0.1` → 1, `5` → 0), capped.
fn decimals(step: f64) -> i32 {
    let mut d = 0;
    let mut s = step;
    while d < 12 && (s - s.round()).abs() > 1e-9 * s.abs().max(1.0) {
        s *= 10.0;
        d += 1;
    }
    d
}

/// `v` rounded to the nearest multiple of `step`, without float noise from the division
/// (`0.30000000000000004` leaves as `0.3`). Integers with an integer step stay integers.
pub(crate) fn round_to_step(v: f64, step: f64, is_int: bool) -> Value {
    let k = (v / step).round();
    let d = decimals(step);
    let scale = 10f64.powi(d);
    let x = (k * step * scale).round() / scale;
    number(x, is_int && d == 0)
}

/// The label of `v`'s half-open bucket: `"[-inf,e0)"`, `"[e0,e1)"`, …, `"[en,inf)"`.
pub(crate) fn bucket_label(v: f64, edges: &[f64]) -> String {
    let i = edges.partition_point(|e| *e <= v);
    let lo = if i == 0 {
        "-inf".to_string()
    } else {
        edges[i - 1].to_string()
    };
    let hi = edges
        .get(i)
        .map_or_else(|| "inf".to_string(), |e| e.to_string());
    format!("[{lo},{hi})")
}

/// The generalised form of a numeric value, `None` for a value that is not a number.
pub(crate) fn generalise(value: &Value, how: &ValueStep) -> Option<Value> {
    let (v, is_int) = match value {
        Value::Int(i) => (*i as f64, true),
        Value::Float(f) if f.is_finite() => (*f, false),
        _ => return None,
    };
    Some(match how {
        ValueStep::Step(step) => round_to_step(v, *step, is_int),
        ValueStep::Buckets(edges) => Value::Text(bucket_label(v, edges)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_to_the_nearest_multiple_without_noise() {
        assert_eq!(round_to_step(231.929, 5.0, false), Value::Float(230.0));
        assert_eq!(round_to_step(0.29, 0.1, false), Value::Float(0.3));
        assert_eq!(round_to_step(1234.0, 100.0, true), Value::Int(1200));
        assert_eq!(round_to_step(1234.0, 0.5, true), Value::Float(1234.0));
    }

    #[test]
    fn buckets_are_half_open_and_labelled() {
        let e = [0.0, 200.0, 220.0, 240.0];
        assert_eq!(bucket_label(-1.0, &e), "[-inf,0)");
        assert_eq!(bucket_label(0.0, &e), "[0,200)");
        assert_eq!(bucket_label(219.9, &e), "[200,220)");
        assert_eq!(bucket_label(240.0, &e), "[240,inf)");
    }
}

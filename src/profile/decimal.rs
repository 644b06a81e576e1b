//! Values keep the precision of their source: no binary noise, no invented digits.
//!
//! A meter's f32 register holding 231.92935 (what its display and vendor tools show: the
//! shortest decimal that reads back as the same f32) widens to the f64
//! 231.92935180664062 — digits nobody measured, repeated in every JSON line at the hub.
//! [`widen_f32`] widens through the shortest decimal instead, so the f64 prints as
//! 231.92935 and still narrows back to the same f32 bits (sentinel comparison relies on
//! it).
//!
//! Scaling in binary adds noise too: 123456 × 0.01 is 1234.5600000000002. The exact
//! decimal result of `raw × scale + offset`, × unit factor × transformer ratio, carries
//! at most as many decimal places as its operands together (and, without an offset, at
//! most as many significant digits), so [`Precision`] tracks those two bounds and
//! [`Precision::settle`] rounds the f64 result to the coarser of them: the nearest f64
//! to the exact decimal. Where the bounds allow more than [`MAX_SIG`] significant digits
//! the result is kept as computed (f64 cannot promise more), so rounding never removes
//! a digit the source warrants. An exact conversion (kWh → Wh × 1000) stays exact.

use std::fmt::{self, Write as _};

/// Most significant digits a decimal is rounded to: 15 decimal digits always survive a
/// round trip through f64.
const MAX_SIG: i32 = 15;

/// Exact powers of ten in f64 (10^22 is the largest exact one).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Integers below this are exact in f64.
const EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// A small stack buffer for `Display` output; long outputs fall back to the heap.
struct StackText {
    bytes: [u8; 64],
    len: usize,
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Calls `f` with `x`'s `Display` text (shortest round-trip digits, never an exponent).
fn with_text<T: fmt::Display, R>(x: T, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = StackText {
        bytes: [0; 64],
        len: 0,
    };
    if write!(buf, "{x}").is_ok() {
        if let Ok(s) = std::str::from_utf8(&buf.bytes[..buf.len]) {
            return f(s);
        }
    }
    f(&x.to_string())
}

/// The f64 nearest to the shortest decimal that reads back as `x`.
pub(crate) fn widen_f32(x: f32) -> f64 {
    if !x.is_finite() {
        return f64::from(x);
    }
    let wide = f64::from(x);
    // Fast path: the fewest decimal places that narrow back to `x`, while those digits
    // are exact in f64 arithmetic (the common range of meter values).
    if wide.abs() >= 1e-6 && wide.abs() < 16_777_216.0 {
        for p in POW10.iter().take(16) {
            let n = (wide * p).round();
            if n.abs() >= EXACT_INT {
                break;
            }
            let candidate = n / p;
            if candidate as f32 == x {
                return candidate;
            }
        }
    }
    with_text(x, |s| s.parse().unwrap_or(wide))
}

/// Bounds on the digits of an exact decimal value: at most `sig` significant digits
/// (`None`: unknown) and no digit below 10^-`places`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Precision {
    sig: Option<i32>,
    places: i32,
}

impl Precision {
    /// An integer: no decimal places, at most as many significant digits as it has.
    pub(crate) fn integer(i: i128) -> Self {
        let digits = i
            .unsigned_abs()
            .checked_ilog10()
            .map_or(1, |d| d as i32 + 1);
        Precision {
            sig: Some(digits),
            places: 0,
        }
    }

    /// The digits of `x`'s shortest decimal (`None` for NaN and infinities).
    pub(crate) fn of(x: f64) -> Option<Self> {
        if !x.is_finite() {
            return None;
        }
        if x == x.trunc() && x.abs() < EXACT_INT {
            return Some(Self::integer(x as i128));
        }
        // Fast path: the fewest decimal places that read back as `x`.
        if x.abs() >= 1e-6 && x.abs() < 1e15 {
            let int_digits = (x.abs().log10().floor() as i32 + 1).max(0);
            for (places, p) in POW10.iter().enumerate().take(16).skip(1) {
                let n = (x * p).round();
                if n.abs() >= EXACT_INT {
                    break;
                }
                if n / p == x {
                    let places = places as i32;
                    return Some(Precision {
                        sig: Some(int_digits + places),
                        places,
                    });
                }
            }
        }
        Some(with_text(x, Self::of_text))
    }

    /// Bounds from a plain decimal text such as `-0.00123` or `1500` (no exponent):
    /// an integer's trailing zeros are not significant (`1500` is 15 × 10^2).
    fn of_text(s: &str) -> Self {
        let s = s.trim_start_matches('-');
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let frac = frac.trim_end_matches('0');
        let digits: String = [int, frac].concat();
        let digits = digits.trim_start_matches('0');
        let (sig, places) = if frac.is_empty() {
            let trimmed = digits.trim_end_matches('0');
            (trimmed.len(), -((digits.len() - trimmed.len()) as i32))
        } else {
            (digits.len(), frac.len() as i32)
        };
        Precision {
            sig: Some(sig.max(1) as i32),
            places,
        }
    }

    /// The bounds of a product: places add up, and so do significant digits.
    pub(crate) fn times(self, other: Precision) -> Self {
        Precision {
            sig: self.sig.zip(other.sig).map(|(a, b)| a + b),
            places: self.places + other.places,
        }
    }

    /// The bounds of a sum: the finer places; significant digits are no longer bounded.
    pub(crate) fn plus(self, other: Precision) -> Self {
        Precision {
            sig: None,
            places: self.places.max(other.places),
        }
    }

    /// `v`, computed in binary, rounded to the exact decimal these bounds allow: the
    /// coarser of the two bounds, if the digits kept are at most [`MAX_SIG`];
    /// otherwise `v` unchanged.
    pub(crate) fn settle(self, v: f64) -> f64 {
        if !v.is_finite() || v == 0.0 {
            return v;
        }
        let mag = magnitude(v);
        // Round to a multiple of 10^exp.
        let by_places = -self.places;
        let exp = match self.sig {
            Some(sig) => by_places.max(mag - sig + 1),
            None => by_places,
        };
        let kept = mag - exp + 1;
        if kept > MAX_SIG {
            return v;
        }
        let rounded = match usize::try_from(-exp) {
            Ok(e) if e < POW10.len() => (v * POW10[e]).round() / POW10[e],
            Err(_) if exp < POW10.len() as i32 => {
                let p = POW10[exp as usize];
                (v / p).round() * p
            }
            _ => format!("{:.*e}", (kept.max(1) - 1) as usize, v)
                .parse()
                .unwrap_or(v),
        };
        // Never show "-0".
        rounded + 0.0
    }
}

/// The decimal exponent of `v`'s leading digit: ⌊log10 |v|⌋, corrected for rounding.
fn magnitude(v: f64) -> i32 {
    let a = v.abs();
    let mut m = a.log10().floor() as i32;
    if 10f64.powi(m) > a {
        m -= 1;
    } else if 10f64.powi(m + 1) <= a {
        m += 1;
    }
    m
}

#[cfg(test)]
mod tests;

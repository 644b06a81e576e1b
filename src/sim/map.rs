//! The register image a simulated meter serves, and engineering value ↔ register
//! conversion for one field.
//!
//! The served map is one contiguous block: from the lowest field address to the end
//! of the highest field. Registers of fields hold their encoded values; holes between
//! fields read as 0; a request that reaches outside the block is an
//! `IllegalDataAddress`.
//!
//! A bit field writes its bit only when no wider field (a `u16` status word, say)
//! covers the same register; otherwise the bit reads whatever that word holds. Every
//! value a snapshot records is decoded back from the final image, so it is exactly
//! what a client decodes.
//!
//! Conversion: `raw = (eng − offset) / scale`, rounded to an integer for integer
//! types and clamped to the type's width, then [`encode`]d. [`fit`] picks the
//! representable value nearest a target that still decodes inside the field's
//! `range`; when none does (a range narrower than one raw step) it serves the nearest.
//! A combined total (integer part + fraction) is split as the meter does: the integer
//! part takes `floor(raw)`, the fraction part `raw − floor(raw)`; its words are the
//! integer part's followed by the fraction's.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::profile::decode::{decode, encode};
use crate::profile::{Field, FieldType, Profile, RawValue};
use crate::reading::{FieldName, RegisterAddress};

/// Largest magnitude used for float-typed fields without a range.
const FLOAT_LIMIT: f64 = 1e30;
/// Attempts [`fit`] makes to move a target inside the range before giving up.
const FIT_ATTEMPTS: usize = 12;

/// The contiguous block of registers a profile's meter serves.
#[derive(Debug, Clone)]
pub(super) struct RegisterMap {
    start: u32,
    len: usize,
    /// Per register of the block: covered by a field wider than one bit.
    covered: Vec<bool>,
}

impl RegisterMap {
    pub(super) fn new(profile: &Profile) -> Self {
        let start = profile
            .fields
            .iter()
            .map(|f| u32::from(f.span().0 .0))
            .min()
            .unwrap_or(0);
        let end = profile
            .fields
            .iter()
            .map(|f| {
                let (a, n) = f.span();
                u32::from(a.0) + u32::from(n)
            })
            .max()
            .unwrap_or(0);
        let len = end.saturating_sub(start) as usize;
        let mut map = Self {
            start,
            len,
            covered: vec![false; len],
        };
        for f in profile.fields.iter().filter(|f| !is_bit(f)) {
            for r in map.index(f) {
                for c in &mut map.covered[r] {
                    *c = true;
                }
            }
        }
        map
    }

    /// Index range of `count` registers from `start` inside the image, if all served.
    pub(super) fn slice(&self, start: RegisterAddress, count: u16) -> Option<Range<usize>> {
        let from = u32::from(start.0).checked_sub(self.start)? as usize;
        let to = from + usize::from(count);
        (to <= self.len).then_some(from..to)
    }

    /// Index ranges of each of the field's parts inside the image, in part order.
    fn index(&self, field: &Field) -> Vec<Range<usize>> {
        field
            .parts()
            .map(|(a, t)| {
                let at = (u32::from(a.0) - self.start) as usize;
                at..at + usize::from(t.words())
            })
            .collect()
    }

    /// The field's words out of the image, parts concatenated.
    fn field_words(&self, field: &Field, image: &[u16]) -> Vec<u16> {
        self.index(field)
            .into_iter()
            .flat_map(|r| image[r].iter().copied())
            .collect()
    }

    /// Builds the image from each field's encoded words (in profile field order).
    pub(super) fn image(&self, profile: &Profile, words: &[Vec<u16>]) -> Vec<u16> {
        let mut image = vec![0u16; self.len];
        let fields = profile.fields.iter().zip(words);
        for (f, w) in fields.clone().filter(|(f, _)| !is_bit(f)) {
            let mut rest = w.as_slice();
            for r in self.index(f) {
                let (part, tail) = rest.split_at(r.len().min(rest.len()));
                image[r.start..r.start + part.len()].copy_from_slice(part);
                rest = tail;
            }
        }
        for (f, w) in fields {
            let FieldType::Bit(bit) = f.ty else { continue };
            let Some(at) = self.index(f).first().map(|r| r.start) else {
                continue;
            };
            if self.covered[at] {
                continue;
            }
            let mask = 1u16 << bit.min(15);
            let word = w.first().copied().unwrap_or(0);
            image[at] = (image[at] & !mask) | (word & mask);
        }
        image
    }

    /// Decodes every field from the image into its engineering value.
    pub(super) fn values(&self, profile: &Profile, image: &[u16]) -> BTreeMap<FieldName, f64> {
        profile
            .fields
            .iter()
            .map(|f| (f.name.clone(), decode_eng(f, &self.field_words(f, image))))
            .collect()
    }
}

fn is_bit(field: &Field) -> bool {
    matches!(field.ty, FieldType::Bit(_))
}

/// The raw values a field's type can hold, as floats.
fn raw_bounds(ty: FieldType) -> (f64, f64) {
    match ty {
        FieldType::U16 => (0.0, f64::from(u16::MAX)),
        FieldType::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
        FieldType::U32 => (0.0, f64::from(u32::MAX)),
        FieldType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
        FieldType::U64 => (0.0, u64::MAX as f64),
        FieldType::I64 => (i64::MIN as f64, i64::MAX as f64),
        FieldType::F32 | FieldType::F64 => (-FLOAT_LIMIT, FLOAT_LIMIT),
        FieldType::Bit(_) => (0.0, 1.0),
    }
}

/// The engineering values a field can serve: its type's capacity, narrowed to its
/// `range`. A range the type cannot hold at all wins (values are then clamped on
/// encoding).
pub(super) fn limits(field: &Field) -> (f64, f64) {
    let (rmin, rmax) = raw_bounds(field.ty);
    let a = rmin * field.scale + field.offset;
    let b = rmax * field.scale + field.offset;
    let (tlo, thi) = (a.min(b), a.max(b));
    match field.range {
        Some((lo, hi)) if lo.max(tlo) <= hi.min(thi) => (lo.max(tlo), hi.min(thi)),
        Some(range) => range,
        None => (tlo, thi),
    }
}

/// Encodes an engineering value (profile unit) into the field's registers (a combined
/// total: the integer part's words, then the fraction's).
pub(super) fn encode_eng(field: &Field, eng: f64) -> Vec<u16> {
    let raw = (eng - field.offset) / field.scale;
    let (rmin, rmax) = raw_bounds(field.ty);
    if let Some(frac) = field.fraction {
        let whole = raw.floor().clamp(rmin, rmax);
        let int = match field.ty {
            FieldType::U16 | FieldType::U32 | FieldType::U64 => RawValue::Unsigned(whole as u64),
            _ => RawValue::Signed(whole as i64),
        };
        let mut words = encode(field.ty, field.order, int);
        words.extend(encode(frac.ty, field.order, RawValue::Float(raw - whole)));
        return words;
    }
    let value = match field.ty {
        FieldType::F32 | FieldType::F64 => RawValue::Float(raw),
        FieldType::Bit(_) => RawValue::Bit(raw >= 0.5),
        FieldType::U16 | FieldType::U32 | FieldType::U64 => {
            RawValue::Unsigned(raw.round().clamp(rmin, rmax) as u64)
        }
        FieldType::I16 | FieldType::I32 | FieldType::I64 => {
            RawValue::Signed(raw.round().clamp(rmin, rmax) as i64)
        }
    };
    encode(field.ty, field.order, value)
}

/// Decodes a field's registers (parts concatenated) into its engineering value (profile
/// unit).
pub(super) fn decode_eng(field: &Field, words: &[u16]) -> f64 {
    // The image always holds exactly the field's registers.
    let (int_words, frac_words) = words.split_at(usize::from(field.words()).min(words.len()));
    let fraction = match field.fraction {
        Some(f) => match decode(f.ty, field.order, frac_words) {
            Ok(v) => v.as_f64(),
            Err(_) => return f64::NAN,
        },
        None => 0.0,
    };
    decode(field.ty, field.order, int_words)
        .map(|raw| (raw.as_f64() + fraction) * field.scale + field.offset)
        .unwrap_or(f64::NAN)
}

/// Encodes the representable value nearest `target` that decodes inside the field's
/// limits; returns the words and the value they decode to.
pub(super) fn fit(field: &Field, target: f64) -> (Vec<u16>, f64) {
    let (lo, hi) = limits(field);
    let mid = lo + (hi - lo) / 2.0;
    let inside = |v: f64| v.is_finite() && v >= lo && v <= hi;
    let mut v = if target.is_finite() {
        target.clamp(lo, hi)
    } else {
        mid
    };
    let mut best = None;
    for _ in 0..FIT_ATTEMPTS {
        let words = encode_eng(field, v);
        let got = decode_eng(field, &words);
        if inside(got) {
            return (words, got);
        }
        best.get_or_insert((words, got));
        v += (mid - v) / 2.0;
    }
    best.unwrap_or_else(|| {
        let words = encode_eng(field, mid);
        let got = decode_eng(field, &words);
        (words, got)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::fixtures::test_profile;

    #[test]
    fn map_spans_lowest_to_highest_field() {
        let p = test_profile();
        let map = RegisterMap::new(&p);
        assert_eq!(map.start, 0);
        assert_eq!(map.len, 0x32);
        assert_eq!(map.slice(RegisterAddress(0), 0x32), Some(0..0x32));
        assert_eq!(map.slice(RegisterAddress(0x31), 2), None);
    }

    #[test]
    fn fit_keeps_values_inside_range_after_rounding() {
        let p = test_profile();
        let current = p.field("current_l1").expect("fixture field");
        let (lo, hi) = limits(current);
        for target in [-5.0, lo, hi, hi - 0.004, hi + 1.0, f64::NAN] {
            let (words, got) = fit(current, target);
            assert!(got >= lo && got <= hi, "{target} -> {got}");
            assert_eq!(decode_eng(current, &words), got);
        }
    }

    #[test]
    fn integer_encoding_clamps_to_type_width() {
        let p = test_profile();
        let power = p.field("power_total").expect("fixture field");
        assert_eq!(decode_eng(power, &encode_eng(power, 1e9)), 32767.0);
        assert_eq!(decode_eng(power, &encode_eng(power, -1e9)), -32768.0);
    }

    const COMBINED: &str = r#"
[meter]
vendor = "Sim"
model = "C1"
protocol = "modbus"
[modbus]
function = 3
address_base = 1
order = "CDAB"
[[field]]
name = "volume_forward"
register = 9
type = "i32"
fraction_register = 11
unit = "m3"
range = [0.0, 99999999.0]
counter = "monotonic"
category = "measurement"
grade = "L2"
"#;

    proptest::proptest! {
        #[test]
        fn combined_totals_split_into_integer_and_fraction(v in 0.0f64..99_999_999.0) {
            let p = Profile::parse(std::path::Path::new("c1.toml"), COMBINED).expect("parses");
            let f = p.field("volume_forward").expect("field");
            let words = encode_eng(f, v);
            proptest::prop_assert_eq!(words.len(), 4);
            // The integer part alone is floor(v), low word first.
            let int = decode(f.ty, f.order, &words[..2]).expect("width").as_f64();
            proptest::prop_assert_eq!(int, v.floor());
            let back = decode_eng(f, &words);
            proptest::prop_assert!((back - v).abs() <= 1e-7, "{} -> {}", v, back);
        }
    }
}

//! Register words ↔ raw values, for every type and word/byte order a profile can name.
//!
//! Orders are named by where the bytes of the big-endian value `A B C D` (…`H`) land in
//! consecutive registers: `ABCD` big-endian words and bytes (the Modbus default),
//! `CDAB` low word first, `BADC` bytes swapped inside each word, `DCBA` fully
//! little-endian. For 64-bit types the same rule applies to four words. Decoding
//! never panics: a wrong number of words is an error. An f32 widens to the f64 of its
//! shortest decimal (`decimal::widen_f32`): 231.92935, not 231.92935180664062.

use std::fmt;

/// A field's register type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// One bit of a 16-bit register, 0 = least significant.
    Bit(u8),
}

impl FieldType {
    pub(crate) const NAMES: &'static str =
        "\"u16\", \"i16\", \"u32\", \"i32\", \"u64\", \"i64\", \"f32\", \"f64\", \"bit\"";

    /// Parses a type name; `bit` needs the bit index from its own key.
    pub(crate) fn parse(name: &str, bit: Option<u8>) -> Option<Self> {
        Some(match name {
            "u16" => FieldType::U16,
            "i16" => FieldType::I16,
            "u32" => FieldType::U32,
            "i32" => FieldType::I32,
            "u64" => FieldType::U64,
            "i64" => FieldType::I64,
            "f32" => FieldType::F32,
            "f64" => FieldType::F64,
            "bit" => FieldType::Bit(bit.unwrap_or(0)),
            _ => return None,
        })
    }

    /// Width in 16-bit registers.
    pub fn words(self) -> u16 {
        match self {
            FieldType::U16 | FieldType::I16 | FieldType::Bit(_) => 1,
            FieldType::U32 | FieldType::I32 | FieldType::F32 => 2,
            FieldType::U64 | FieldType::I64 | FieldType::F64 => 4,
        }
    }

    pub(crate) fn is_integer(self) -> bool {
        !matches!(self, FieldType::F32 | FieldType::F64 | FieldType::Bit(_))
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldType::U16 => f.write_str("u16"),
            FieldType::I16 => f.write_str("i16"),
            FieldType::U32 => f.write_str("u32"),
            FieldType::I32 => f.write_str("i32"),
            FieldType::U64 => f.write_str("u64"),
            FieldType::I64 => f.write_str("i64"),
            FieldType::F32 => f.write_str("f32"),
            FieldType::F64 => f.write_str("f64"),
            FieldType::Bit(b) => write!(f, "bit{b}"),
        }
    }
}

/// Word and byte order of a multi-register value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WordOrder {
    #[default]
    Abcd,
    Cdab,
    Badc,
    Dcba,
}

impl WordOrder {
    pub(crate) const NAMES: &'static str = "\"ABCD\", \"CDAB\", \"BADC\", \"DCBA\"";

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ABCD" => WordOrder::Abcd,
            "CDAB" => WordOrder::Cdab,
            "BADC" => WordOrder::Badc,
            "DCBA" => WordOrder::Dcba,
            _ => return None,
        })
    }

    fn word_swapped(self) -> bool {
        matches!(self, WordOrder::Cdab | WordOrder::Dcba)
    }

    fn byte_swapped(self) -> bool {
        matches!(self, WordOrder::Badc | WordOrder::Dcba)
    }
}

impl fmt::Display for WordOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WordOrder::Abcd => "ABCD",
            WordOrder::Cdab => "CDAB",
            WordOrder::Badc => "BADC",
            WordOrder::Dcba => "DCBA",
        })
    }
}

/// A decoded register value before scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawValue {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bit(bool),
}

impl RawValue {
    pub fn as_f64(self) -> f64 {
        match self {
            RawValue::Unsigned(u) => u as f64,
            RawValue::Signed(i) => i as f64,
            RawValue::Float(f) => f,
            RawValue::Bit(b) => f64::from(u8::from(b)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ty} needs {expected} registers, got {got}")]
pub struct WidthError {
    pub ty: FieldType,
    pub expected: u16,
    pub got: usize,
}

/// Puts the words into big-endian value order.
fn canonical_bytes(order: WordOrder, words: &[u16]) -> Vec<u8> {
    let mut ws: Vec<u16> = words.to_vec();
    if order.word_swapped() {
        ws.reverse();
    }
    ws.iter()
        .flat_map(|w| {
            let w = if order.byte_swapped() {
                w.swap_bytes()
            } else {
                *w
            };
            w.to_be_bytes()
        })
        .collect()
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Decodes a field's registers. `words.len()` must equal `ty.words()`.
pub fn decode(ty: FieldType, order: WordOrder, words: &[u16]) -> Result<RawValue, WidthError> {
    if words.len() != usize::from(ty.words()) {
        return Err(WidthError {
            ty,
            expected: ty.words(),
            got: words.len(),
        });
    }
    let bytes = canonical_bytes(order, words);
    let v = be_u64(&bytes);
    Ok(match ty {
        FieldType::U16 | FieldType::U32 | FieldType::U64 => RawValue::Unsigned(v),
        FieldType::I16 => RawValue::Signed(i64::from(v as u16 as i16)),
        FieldType::I32 => RawValue::Signed(i64::from(v as u32 as i32)),
        FieldType::I64 => RawValue::Signed(v as i64),
        FieldType::F32 => RawValue::Float(super::decimal::widen_f32(f32::from_bits(v as u32))),
        FieldType::F64 => RawValue::Float(f64::from_bits(v)),
        FieldType::Bit(b) => RawValue::Bit(b < 16 && (v >> b) & 1 == 1),
    })
}

/// Encodes a raw value into registers (for simulators and test images). Out-of-range
/// values are truncated to the type's width, floats rounded to f32 where needed.
pub fn encode(ty: FieldType, order: WordOrder, raw: RawValue) -> Vec<u16> {
    let bits: u64 = match (ty, raw) {
        (FieldType::F32, r) => u64::from((r.as_f64() as f32).to_bits()),
        (FieldType::F64, r) => r.as_f64().to_bits(),
        (FieldType::Bit(b), r) => u64::from(r.as_f64() != 0.0) << b.min(15),
        (_, RawValue::Unsigned(u)) => u,
        (_, RawValue::Signed(i)) => i as u64,
        (_, RawValue::Float(f)) if ty.is_integer() && f < 0.0 => (f.round() as i64) as u64,
        (_, r) => r.as_f64().round() as u64,
    };
    let n = usize::from(ty.words());
    let mut words: Vec<u16> = (0..n).rev().map(|i| (bits >> (16 * i)) as u16).collect();
    if order.byte_swapped() {
        for w in &mut words {
            *w = w.swap_bytes();
        }
    }
    if order.word_swapped() {
        words.reverse();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn f32_orders_decode_230_2_volts() {
        // 230.2f32 = 0x4366_3333 (Tasmota's DDSU666 trace shows 43 66 33 34 ≈ 230.2).
        let cases = [
            (WordOrder::Abcd, [0x4366, 0x3333]),
            (WordOrder::Cdab, [0x3333, 0x4366]),
            (WordOrder::Badc, [0x6643, 0x3333]),
            (WordOrder::Dcba, [0x3333, 0x6643]),
        ];
        for (order, words) in cases {
            let v = decode(FieldType::F32, order, &words).unwrap().as_f64();
            assert!((v - 230.2).abs() < 1e-4, "{order}: {v}");
        }
    }

    #[test]
    fn signed_and_unsigned_integers() {
        assert_eq!(
            decode(FieldType::I16, WordOrder::Abcd, &[0xFFFE]).unwrap(),
            RawValue::Signed(-2)
        );
        assert_eq!(
            decode(FieldType::U16, WordOrder::Abcd, &[0xFFFE]).unwrap(),
            RawValue::Unsigned(65534)
        );
        assert_eq!(
            decode(FieldType::U32, WordOrder::Cdab, &[0x5678, 0x1234]).unwrap(),
            RawValue::Unsigned(0x1234_5678)
        );
        assert_eq!(
            decode(FieldType::I32, WordOrder::Abcd, &[0xFFFF, 0xFFFF]).unwrap(),
            RawValue::Signed(-1)
        );
        assert_eq!(
            decode(
                FieldType::U64,
                WordOrder::Dcba,
                &[0x0807, 0x0605, 0x0403, 0x0201]
            )
            .unwrap(),
            RawValue::Unsigned(0x0102_0304_0506_0708)
        );
    }

    #[test]
    fn bits_and_widths() {
        assert_eq!(
            decode(FieldType::Bit(3), WordOrder::Abcd, &[0b1000]).unwrap(),
            RawValue::Bit(true)
        );
        assert_eq!(
            decode(FieldType::Bit(2), WordOrder::Abcd, &[0b1000]).unwrap(),
            RawValue::Bit(false)
        );
        let err = decode(FieldType::F32, WordOrder::Abcd, &[1]).unwrap_err();
        assert_eq!(err.expected, 2);
    }

    fn any_order() -> impl Strategy<Value = WordOrder> {
        prop_oneof![
            Just(WordOrder::Abcd),
            Just(WordOrder::Cdab),
            Just(WordOrder::Badc),
            Just(WordOrder::Dcba)
        ]
    }

    proptest! {
        #[test]
        fn u64_round_trips(v: u64, order in any_order()) {
            let words = encode(FieldType::U64, order, RawValue::Unsigned(v));
            prop_assert_eq!(decode(FieldType::U64, order, &words).unwrap(), RawValue::Unsigned(v));
        }

        #[test]
        fn i32_round_trips(v: i32, order in any_order()) {
            let words = encode(FieldType::I32, order, RawValue::Signed(i64::from(v)));
            prop_assert_eq!(decode(FieldType::I32, order, &words).unwrap(), RawValue::Signed(i64::from(v)));
        }

        #[test]
        fn f64_round_trips(v in proptest::num::f64::NORMAL, order in any_order()) {
            let words = encode(FieldType::F64, order, RawValue::Float(v));
            prop_assert_eq!(decode(FieldType::F64, order, &words).unwrap(), RawValue::Float(v));
        }

        #[test]
        fn decode_never_panics(words in proptest::collection::vec(any::<u16>(), 0..6), order in any_order()) {
            for ty in [FieldType::U16, FieldType::I64, FieldType::F32, FieldType::Bit(15)] {
                let _ = decode(ty, order, &words);
            }
        }
    }
}

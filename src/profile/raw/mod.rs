//! The profile file as written (serde, `deny_unknown_fields`) and its one-time
//! conversion into validated [`Profile`]s, collecting every error with its location.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

pub(super) mod common;
mod layout;

use common::{default_true, Check, RawMeter};
use layout::{conflict, convert_fraction, Part};

use super::{
    Counter, Field, FieldType, FunctionCode, LineSettings, Parity, Profile, Ratio, WordOrder,
    DEFAULT_MAX_GAP_REGISTERS, MAX_REGISTERS_PER_READ,
};
use crate::diag::{Diagnostic, SourceFile};
use crate::reading::{Category, RegisterAddress, Stream};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    meter: RawMeter,
    modbus: RawModbus,
    line: Option<RawLine>,
    #[serde(rename = "field", default)]
    fields: Vec<RawField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModbus {
    function: Spanned<u8>,
    address_base: Option<Spanned<u16>>,
    order: Option<Spanned<String>>,
    max_gap_registers: Option<u16>,
    max_registers_per_read: Option<Spanned<u16>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    baud: u32,
    #[serde(default = "default_data_bits")]
    data_bits: u8,
    parity: Parity,
    #[serde(default = "default_stop_bits")]
    stop_bits: u8,
}

fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: Spanned<String>,
    register: Spanned<u32>,
    #[serde(rename = "type")]
    ty: Spanned<String>,
    bit: Option<Spanned<u8>>,
    order: Option<Spanned<String>>,
    scale: Option<Spanned<f64>>,
    offset: Option<f64>,
    unit: Spanned<String>,
    range: Option<Spanned<Vec<f64>>>,
    #[serde(default)]
    sentinels: Vec<Spanned<toml::Value>>,
    counter: Option<Spanned<String>>,
    rollover: Option<Spanned<f64>>,
    /// Largest plausible change per second in `unit` (counters: of the increments).
    max_rate: Option<Spanned<f64>>,
    /// Identical values in a row from which a gauge counts as frozen.
    frozen_after: Option<Spanned<u32>>,
    /// Combined total: the register of the fraction added to this field's integer part.
    fraction_register: Option<Spanned<u32>>,
    /// Type of the fraction part (default "f32").
    fraction_type: Option<Spanned<String>>,
    /// Transformer ratio for secondary-side values: "ct", "pt" or "ct_pt".
    ratio: Option<Spanned<String>>,
    /// "readings" or "alarms" (default: "alarms" for category "alarm").
    stream: Option<Spanned<String>>,
    /// Required; an `Option` so a missing one is reported with the valid values.
    category: Option<Spanned<String>>,
    grade: Option<Spanned<String>>,
    #[serde(default)]
    personal: bool,
    #[serde(default = "default_true")]
    verified: bool,
    note: Option<String>,
}

pub(super) fn parse(path: &Path, text: &str) -> Result<Profile, Vec<Diagnostic>> {
    let src = SourceFile::new(path, text);
    let raw: RawProfile = src.parse().map_err(|d| vec![d])?;
    let mut c = Check::new(src);
    if raw.meter.protocol.get_ref() != "modbus" {
        c.err(
            raw.meter.protocol.span(),
            "meter.protocol".into(),
            format!(
                "unsupported protocol {:?}; valid: \"modbus\", \"mqtt\"",
                raw.meter.protocol.get_ref()
            ),
        );
    }
    let function = match *raw.modbus.function.get_ref() {
        3 => FunctionCode::ReadHolding,
        4 => FunctionCode::ReadInput,
        other => {
            c.err(
                raw.modbus.function.span(),
                "modbus.function".into(),
                format!(
                    "function code {other} is not a register read; valid: 3 (holding) or 4 (input)"
                ),
            );
            FunctionCode::ReadHolding
        }
    };
    let address_base = raw.modbus.address_base.as_ref().map_or(0, |b| *b.get_ref());
    if let Some(b) = raw
        .modbus
        .address_base
        .as_ref()
        .filter(|_| address_base > 1)
    {
        c.err(
            b.span(),
            "modbus.address_base".into(),
            format!("address_base {address_base} is not valid; valid: 0 (registers are wire addresses) or 1 (documented numbers start at 1)"),
        );
    }
    let default_order =
        parse_order(&mut c, raw.modbus.order.as_ref(), "modbus.order").unwrap_or_default();
    let max_registers_per_read = match &raw.modbus.max_registers_per_read {
        Some(m) if !(1..=MAX_REGISTERS_PER_READ).contains(m.get_ref()) => {
            c.err(
                m.span(),
                "modbus.max_registers_per_read".into(),
                format!("must be 1..={MAX_REGISTERS_PER_READ}"),
            );
            MAX_REGISTERS_PER_READ
        }
        Some(m) => *m.get_ref(),
        None => MAX_REGISTERS_PER_READ,
    };
    let line = raw.line.map(|l| LineSettings {
        baud: l.baud,
        data_bits: l.data_bits,
        parity: l.parity,
        stop_bits: l.stop_bits,
    });

    let mut fields: Vec<Field> = Vec::with_capacity(raw.fields.len());
    let mut spans: Vec<Range<usize>> = Vec::new();
    for (i, f) in raw.fields.into_iter().enumerate() {
        let key = format!("field[{i}]");
        let reg_span = f.register.span();
        let frac_span = f.fraction_register.as_ref().map(Spanned::span);
        let limits = (address_base, default_order, max_registers_per_read);
        if let Some(field) = convert_field(&mut c, &key, f, limits) {
            for (j, other) in fields.iter().enumerate() {
                if let Some((part, msg)) = conflict(&field, other) {
                    let other_line = crate::diag::line_col(text, spans[j].start).0;
                    let (span, k) = match (part, &frac_span) {
                        (Part::Fraction, Some(fs)) => (fs.clone(), "fraction_register"),
                        _ => (reg_span.clone(), "register"),
                    };
                    c.err(
                        span,
                        format!("{key}({}).{k}", field.name),
                        format!("{msg} (line {other_line})"),
                    );
                }
            }
            fields.push(field);
            spans.push(reg_span);
        }
    }
    c.finish(fields.is_empty())?;
    Ok(Profile {
        function,
        address_base,
        max_gap_registers: raw
            .modbus
            .max_gap_registers
            .unwrap_or(DEFAULT_MAX_GAP_REGISTERS),
        max_registers_per_read,
        line,
        ..common::profile(path, text, raw.meter, fields)
    })
}

fn parse_order(c: &mut Check<'_>, order: Option<&Spanned<String>>, key: &str) -> Option<WordOrder> {
    let o = order?;
    let parsed = WordOrder::parse(o.get_ref());
    if parsed.is_none() {
        c.err(
            o.span(),
            key.to_string(),
            format!(
                "unknown order {:?}; valid: {}",
                o.get_ref(),
                WordOrder::NAMES
            ),
        );
    }
    parsed
}

fn convert_field(
    c: &mut Check<'_>,
    key: &str,
    f: RawField,
    (address_base, default_order, max_registers_per_read): (u16, WordOrder, u16),
) -> Option<Field> {
    let before = c.errors.len();
    let (name, key) = common::name(c, key, &f.name);
    let bit = f.bit.as_ref().map(|b| *b.get_ref());
    let ty = FieldType::parse(f.ty.get_ref(), bit);
    match (ty, &f.bit) {
        (None, _) => c.err(
            f.ty.span(),
            format!("{key}.type"),
            format!(
                "unknown register type {:?}; valid: {}",
                f.ty.get_ref(),
                FieldType::NAMES
            ),
        ),
        (Some(FieldType::Bit(_)), None) => c.err(
            f.ty.span(),
            format!("{key}.type"),
            "type \"bit\" needs `bit = N` (0 = least significant bit of the register)".into(),
        ),
        (Some(FieldType::Bit(n)), Some(b)) if n > 15 => c.err(
            b.span(),
            format!("{key}.bit"),
            format!("bit {n} does not exist in a 16-bit register; valid: 0..=15"),
        ),
        (Some(t), Some(b)) if !matches!(t, FieldType::Bit(_)) => c.err(
            b.span(),
            format!("{key}.bit"),
            format!(
                "`bit` only applies to type \"bit\", not {:?}",
                f.ty.get_ref()
            ),
        ),
        _ => {}
    }
    let order = parse_order(c, f.order.as_ref(), &format!("{key}.order")).unwrap_or(default_order);
    let register = *f.register.get_ref();
    let words = ty.map_or(1, FieldType::words);
    let wire = register.checked_sub(u32::from(address_base));
    let address = match wire {
        Some(w) if w + u32::from(words) <= 0x1_0000 => Some(RegisterAddress(w as u16)),
        _ => {
            c.err(
                f.register.span(),
                format!("{key}.register"),
                format!(
                    "register {register} with address_base {address_base} and width {words} is outside 0..=65535 on the wire"
                ),
            );
            None
        }
    };
    let unit = common::unit(c, &key, &f.unit);
    let scale = common::scale(c, &key, f.scale.as_ref());
    let range = common::range(c, &key, f.range.as_ref());
    let sentinels = f
        .sentinels
        .iter()
        .filter(|_| ty.is_some())
        .filter_map(|s| {
            parse_sentinel(s.get_ref(), words)
                .map_err(|m| c.err(s.span(), format!("{key}.sentinels"), m))
                .ok()
        })
        .collect();
    let counter = common::counter(c, &key, f.counter.as_ref(), f.rollover.as_ref());
    let (max_rate, frozen_after) = common::quality_limits(
        c,
        &key,
        !matches!(ty, Some(FieldType::Bit(_))),
        counter,
        f.max_rate.as_ref(),
        f.frozen_after.as_ref(),
    );
    let class = common::classification(
        c,
        &key,
        &f.name,
        f.category.as_ref(),
        f.grade.as_ref(),
        f.personal,
    );
    // `rollover` is refused only without a counter, so this error never joins that one.
    if let (Counter::Monotonic { .. }, Some(FieldType::Bit(_)), Some(s)) = (counter, ty, &f.counter)
    {
        c.err(
            s.span(),
            format!("{key}.counter"),
            "a bit cannot be a monotonic counter".into(),
        );
    }
    let fraction = convert_fraction(c, &key, &f, ty, address, address_base);
    if let (Some(fr), Some(a), Some(t)) = (&fraction, address, ty) {
        let whole = Field::span_of([(a, t), (fr.address, fr.ty)]);
        if whole.1 > max_registers_per_read {
            c.err(
                f.fraction_register.as_ref().map_or(f.register.span(), Spanned::span),
                format!("{key}.fraction_register"),
                format!(
                    "the integer part and the fraction span {} registers; one read (max_registers_per_read = {max_registers_per_read}) must hold both so they cannot tear",
                    whole.1
                ),
            );
        }
    }
    let ratio = f.ratio.as_ref().and_then(|r| {
        let parsed = Ratio::parse(r.get_ref());
        match (parsed, unit) {
            (None, _) => c.err(
                r.span(),
                format!("{key}.ratio"),
                format!("unknown ratio {:?}; valid: {}", r.get_ref(), Ratio::NAMES),
            ),
            (Some(p), Some(u)) if !p.applies_to(u.canonical) => c.err(
                r.span(),
                format!("{key}.ratio"),
                format!(
                    "ratio \"{p}\" does not apply to a field in {} ({}); valid for \"{p}\": {}",
                    u.symbol,
                    u.canonical,
                    p.valid_units()
                ),
            ),
            _ => {}
        }
        parsed
    });
    let stream = match f.stream.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
        None if class.is_some_and(|k| k.category == Category::Alarm) => Stream::Alarms,
        None | Some(("readings", _)) => Stream::Readings,
        Some(("alarms", _)) => Stream::Alarms,
        Some((other, span)) => {
            c.err(
                span,
                format!("{key}.stream"),
                format!("unknown stream {other:?}; valid: \"readings\", \"alarms\""),
            );
            Stream::Readings
        }
    };
    if stream == Stream::Alarms && class.is_some_and(|k| k.category == Category::Identifier) {
        c.err(
            f.stream.as_ref().map_or(f.name.span(), Spanned::span),
            format!("{key}.stream"),
            "an identifier cannot travel on the alarms stream; valid: \"readings\"".into(),
        );
    }
    if c.errors.len() > before {
        return None;
    }
    Some(Field {
        name: name?,
        register,
        address: address?,
        ty: ty?,
        order,
        scale,
        offset: f.offset.unwrap_or(0.0),
        unit: unit?,
        range,
        sentinels,
        counter,
        max_rate,
        frozen_after,
        fraction,
        ratio,
        stream,
        class: class?,
        verified: f.verified,
        note: f.note,
    })
}

/// A sentinel is a raw register bit pattern: an integer, or a string in hex (`"0xFFFF"`)
/// for patterns above i64::MAX. It must fit the field's width.
fn parse_sentinel(v: &toml::Value, words: u16) -> Result<u64, String> {
    let bits = match v {
        toml::Value::Integer(i) if *i >= 0 => *i as u64,
        toml::Value::String(s) => common::hex_sentinel(s)?,
        other => {
            return Err(format!(
                "sentinel {other} must be a non-negative integer or a hex string"
            ))
        }
    };
    let width_bits = 16 * u32::from(words);
    if width_bits < 64 && bits >> width_bits != 0 {
        return Err(format!(
            "sentinel {bits:#x} is wider than the field's {width_bits} bits"
        ));
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[meter]
vendor = "Test"
model = "T1"
protocol = "modbus"

[modbus]
function = 4
address_base = 0

[[field]]
name = "voltage_l1"
register = 0x2000
type = "f32"
unit = "V"
range = [0.0, 400.0]
category = "measurement"
grade = "L2"

[[field]]
name = "energy_import"
register = 0x4000
type = "u32"
order = "CDAB"
scale = 0.01
unit = "kWh"
counter = "monotonic"
sentinels = [0xFFFFFFFF]
category = "measurement"
grade = "L3"

[[field]]
name = "relay_open"
register = 0x10
type = "bit"
bit = 2
unit = "1"
category = "status"
grade = "L2"
"#;

    fn parse_str(text: &str) -> Result<Profile, Vec<Diagnostic>> {
        parse(Path::new("firmware-profiles/test-t1.toml"), text)
    }

    #[test]
    fn good_profile_loads() {
        let p = parse_str(GOOD).unwrap();
        assert_eq!(p.name, "test-t1");
        assert_eq!(p.function, FunctionCode::ReadInput);
        let e = p.field("energy_import").unwrap();
        assert_eq!(e.order, WordOrder::Cdab);
        assert_eq!(e.sentinels, vec![0xFFFF_FFFF]);
        assert_eq!(e.unit.factor, 1000.0);
        assert!(matches!(e.counter, Counter::Monotonic { rollover: None }));
        assert_eq!(p.field("relay_open").unwrap().ty, FieldType::Bit(2));
        assert_eq!(p.version.len(), 16);
    }

    fn one_error(text: &str) -> Diagnostic {
        let errs = parse_str(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.into_iter().next().unwrap()
    }

    #[test]
    fn bad_type_is_located() {
        let text = GOOD.replacen("type = \"u32\"", "type = \"u24\"", 1);
        let e = one_error(&text);
        assert_eq!(e.line, 23, "{e}");
        assert!(e.key.ends_with("energy_import).type"), "{e}");
        assert!(e.message.contains("\"u32\""), "lists valid types: {e}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let text = GOOD.replacen("grade = \"L3\"", "grade = \"L3\"\ncolour = \"red\"", 1);
        let e = one_error(&text);
        assert_eq!(e.line, 31, "{e}");
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn overlapping_registers_are_rejected() {
        let text = GOOD.replacen("register = 0x4000", "register = 0x2001", 1);
        let e = one_error(&text);
        assert!(e.message.contains("overlap field `voltage_l1`"), "{e}");
        assert!(e.message.contains("line 13"), "{e}");
    }

    #[test]
    fn unknown_unit_lists_valid_units() {
        let e = one_error(&GOOD.replacen("unit = \"V\"", "unit = \"volts\"", 1));
        assert!(e.key.ends_with(".unit"), "{e}");
        assert!(e.message.contains("\"kWh\""), "{e}");
    }

    #[test]
    fn bit_without_index_and_wide_sentinel_are_rejected() {
        let e = one_error(&GOOD.replacen("bit = 2\n", "", 1));
        assert!(e.message.contains("bit = N"), "{e}");
        let e = one_error(&GOOD.replacen("0xFFFFFFFF]", "\"0x1FFFFFFFF\"]", 1));
        assert!(e.message.contains("wider"), "{e}");
    }

    #[test]
    fn address_base_one_shifts_wire_address() {
        let p = parse_str(&GOOD.replacen("address_base = 0", "address_base = 1", 1)).unwrap();
        assert_eq!(
            p.field("voltage_l1").unwrap().address,
            RegisterAddress(0x1FFF)
        );
        let e = one_error(
            &GOOD
                .replacen("address_base = 0", "address_base = 1", 1)
                .replacen("register = 0x10", "register = 0", 1),
        );
        assert!(e.message.contains("outside"), "{e}");
    }

    const COMBINED: &str = r#"
[meter]
vendor = "Test"
model = "T2"
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
counter = "monotonic"
category = "measurement"
grade = "L2"

[[field]]
name = "current_l1"
register = 20
type = "u16"
scale = 0.01
unit = "A"
ratio = "ct"
category = "measurement"
grade = "L3"

[[field]]
name = "tamper"
register = 30
type = "bit"
bit = 0
unit = "1"
stream = "alarms"
category = "status"
grade = "L2"

[[field]]
name = "door_open"
register = 30
type = "bit"
bit = 1
unit = "1"
category = "alarm"
grade = "L2"
"#;

    #[test]
    fn combined_total_ratio_and_stream_load() {
        let p = parse_str(COMBINED).unwrap();
        let v = p.field("volume_forward").unwrap();
        let frac = v.fraction.unwrap();
        assert_eq!(
            (frac.register, frac.address, frac.ty),
            (11, RegisterAddress(10), FieldType::F32)
        );
        assert_eq!(v.span(), (RegisterAddress(8), 4));
        assert!(!v.keeps_integer());
        assert_eq!(p.field("current_l1").unwrap().ratio, Some(Ratio::Ct));
        assert_eq!(p.field("tamper").unwrap().stream, Stream::Alarms);
        assert_eq!(
            p.field("door_open").unwrap().stream,
            Stream::Alarms,
            "category alarm defaults to alarms"
        );
        assert_eq!(v.stream, Stream::Readings);
    }

    #[test]
    fn fraction_overlapping_its_integer_part_is_rejected() {
        let e =
            one_error(&COMBINED.replacen("fraction_register = 11", "fraction_register = 10", 1));
        assert_eq!(e.line, 16, "{e}");
        assert!(e.key.ends_with("(volume_forward).fraction_register"), "{e}");
        assert!(e.message.contains("overlap the integer part"), "{e}");
    }

    #[test]
    fn fraction_overlapping_another_field_is_rejected_at_the_fraction() {
        let e = one_error(&COMBINED.replacen("register = 20", "register = 12", 1));
        assert!(e.message.contains("overlap field `volume_forward`"), "{e}");
        assert!(e.message.contains("line 14"), "{e}");
        // When the combined field comes second, its fraction's key is the one located.
        let later = COMBINED.replacen(
            "[[field]]\nname = \"volume_forward\"",
            "[[field]]\nname = \"pulse_count\"\nregister = 3\ntype = \"u16\"\nunit = \"1\"\ncategory = \"status\"\ngrade = \"L1\"\n\n[[field]]\nname = \"volume_forward\"",
            1,
        )
        .replacen("fraction_register = 11", "fraction_register = 3", 1);
        let e = one_error(&later);
        assert_eq!(e.line, 24, "{e}");
        assert!(e.key.ends_with("(volume_forward).fraction_register"), "{e}");
        assert!(e.message.contains("overlap field `pulse_count`"), "{e}");
    }

    #[test]
    fn bad_combined_totals_are_explained() {
        let e = one_error(&COMBINED.replacen("type = \"i32\"\n", "type = \"f32\"\n", 1));
        assert!(
            e.key.ends_with(".type") && e.message.contains("integer type"),
            "{e}"
        );
        let e = one_error(&COMBINED.replacen(
            "fraction_register = 11\n",
            "fraction_register = 11\nfraction_type = \"bit\"\n",
            1,
        ));
        assert!(
            e.key.ends_with(".fraction_type") && e.message.contains("\"f32\""),
            "{e}"
        );
        let e =
            one_error(&COMBINED.replacen("fraction_register = 11", "fraction_register = 200", 1));
        assert!(
            e.message.contains("one read"),
            "the parts must fit one request: {e}"
        );
        let e = one_error(
            &COMBINED
                .replacen("unit = \"m3\"", "fraction_type = \"f32\"\nunit = \"m3\"", 1)
                .replacen("fraction_register = 11\n", "", 1),
        );
        assert!(e.message.contains("needs fraction_register"), "{e}");
    }

    #[test]
    fn ratio_must_fit_the_unit() {
        let e = one_error(&COMBINED.replacen("ratio = \"ct\"", "ratio = \"pt\"", 1));
        assert_eq!(e.line, 28, "{e}");
        assert!(e.key.ends_with("(current_l1).ratio"), "{e}");
        assert!(
            e.message.contains("V (voltages)"),
            "says what is valid: {e}"
        );
        let e = one_error(&COMBINED.replacen("ratio = \"ct\"", "ratio = \"ct*pt\"", 1));
        assert!(e.message.contains("\"ct_pt\""), "{e}");
        // A ratio on a field with no electrical unit (a water volume).
        let e = one_error(&COMBINED.replacen(
            "counter = \"monotonic\"",
            "counter = \"monotonic\"\nratio = \"ct_pt\"",
            1,
        ));
        assert!(e.key.ends_with("(volume_forward).ratio"), "{e}");
        assert!(e.message.contains("does not apply to a field in m3"), "{e}");
    }

    /// Issue 11 acceptance: a field without `category` or `grade` is an error at the
    /// field, naming the key and the valid values (not serde's bare "missing field").
    #[test]
    fn classification_is_required_with_valid_values() {
        let e = one_error(&GOOD.replacen("grade = \"L3\"\n", "", 1));
        assert_eq!(e.line, 21, "the field's name line: {e}");
        assert!(e.key.ends_with("(energy_import).grade"), "{e}");
        assert!(e.message.contains("\"L1\", \"L2\", \"L3\", \"L4\""), "{e}");
        let e = one_error(&GOOD.replacen("category = \"status\"", "category = \"state\"", 1));
        assert!(e.key.ends_with("(relay_open).category"), "{e}");
        assert!(e.message.contains("\"measurement\", \"status\""), "{e}");
    }

    /// Issue 11 item 6: `frozen_after` is refused on a counter (unchanged totals are
    /// normal), and both quality limits must be meaningful numbers.
    #[test]
    fn quality_limits_are_validated() {
        let p = parse_str(&GOOD.replacen(
            "range = [0.0, 400.0]",
            "range = [0.0, 400.0]\nmax_rate = 50.0\nfrozen_after = 10",
            1,
        ))
        .unwrap();
        let v = p.field("voltage_l1").unwrap();
        assert_eq!((v.max_rate, v.frozen_after), (Some(50.0), Some(10)));
        let e = one_error(&GOOD.replacen(
            "counter = \"monotonic\"",
            "counter = \"monotonic\"\nfrozen_after = 10",
            1,
        ));
        assert_eq!(e.line, 28, "{e}");
        assert!(e.key.ends_with("(energy_import).frozen_after"), "{e}");
        assert!(e.message.contains("counter"), "{e}");
        let e = one_error(&GOOD.replacen("range = [0.0, 400.0]", "max_rate = 0.0", 1));
        assert!(e.key.ends_with("(voltage_l1).max_rate"), "{e}");
        let e = one_error(&GOOD.replacen("bit = 2", "bit = 2\nfrozen_after = 5", 1));
        assert!(e.key.ends_with("(relay_open).frozen_after"), "{e}");
    }

    #[test]
    fn stream_must_be_readings_or_alarms() {
        let e = one_error(&COMBINED.replacen("stream = \"alarms\"", "stream = \"audit\"", 1));
        assert!(e.key.ends_with("(tamper).stream"), "{e}");
        assert!(e.message.contains("\"alarms\""), "{e}");
        let e = one_error(
            &GOOD
                .replacen(
                    "grade = \"L3\"\n",
                    "grade = \"L3\"\nstream = \"alarms\"\n",
                    1,
                )
                .replacen(
                    "category = \"measurement\"\ngrade = \"L3\"",
                    "category = \"identifier\"\ngrade = \"L3\"",
                    1,
                ),
        );
        assert!(e.message.contains("identifier"), "{e}");
    }
}

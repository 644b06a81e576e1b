//! What the Modbus and the MQTT profile parsers share: the error collector, the
//! `[meter]` table, the field attributes both kinds of field take (name, unit,
//! scale, range, counter/rollover, quality limits, classification, hex sentinels) and the
//! profile's identity.
//! Each check keeps the key (`field[3](voltage_l1).unit`) and message its parser had.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::diag::{Diagnostic, SourceFile};
use crate::profile::{
    Counter, Field, FunctionCode, Profile, ProfileUnit, DEFAULT_MAX_GAP_REGISTERS,
    MAX_REGISTERS_PER_READ,
};
use crate::reading::{Category, Classification, FieldName, Grade};

/// The `[meter]` table of every profile.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::profile) struct RawMeter {
    pub vendor: String,
    pub model: String,
    pub firmware: Option<String>,
    pub description: Option<String>,
    pub protocol: Spanned<String>,
    /// Where the register map or payload format comes from (documentation only).
    #[serde(default)]
    pub sources: Vec<String>,
}

pub(in crate::profile) fn default_true() -> bool {
    true
}

/// Collects diagnostics while converting.
pub(in crate::profile) struct Check<'a> {
    src: SourceFile<'a>,
    pub errors: Vec<Diagnostic>,
}

impl<'a> Check<'a> {
    pub(crate) fn new(src: SourceFile<'a>) -> Self {
        Check {
            src,
            errors: Vec::new(),
        }
    }

    pub(crate) fn err(&mut self, span: Range<usize>, key: String, message: String) {
        self.errors.push(self.src.at(span, key, message));
    }

    /// The profile's errors, adding one if it has no field and no other error.
    pub(crate) fn finish(mut self, no_fields: bool) -> Result<(), Vec<Diagnostic>> {
        if no_fields && self.errors.is_empty() {
            self.errors.push(
                self.src
                    .whole("field", "a profile needs at least one [[field]]"),
            );
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

/// A profile of `fields` named by `path`'s stem and versioned by `text`'s digest, with
/// the register settings of a profile that declares none (those of an MQTT profile).
pub(in crate::profile) fn profile(
    path: &Path,
    text: &str,
    meter: RawMeter,
    fields: Vec<Field>,
) -> Profile {
    let digest = Sha256::digest(text.as_bytes());
    Profile {
        name: path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string(),
        path: path.to_path_buf(),
        vendor: meter.vendor,
        model: meter.model,
        firmware: meter.firmware,
        description: meter.description.or_else(|| {
            (!meter.sources.is_empty()).then(|| format!("sources: {}", meter.sources.join("; ")))
        }),
        function: FunctionCode::ReadHolding,
        address_base: 0,
        max_gap_registers: DEFAULT_MAX_GAP_REGISTERS,
        max_registers_per_read: MAX_REGISTERS_PER_READ,
        line: None,
        fields,
        version: hex::encode(&digest[..8]),
        mqtt: None,
    }
}

/// The field's name and the key its other attributes are reported under:
/// `field[3](voltage_l1)`, or `field[3]` when the name is not valid.
pub(in crate::profile) fn name(
    c: &mut Check<'_>,
    key: &str,
    name: &Spanned<String>,
) -> (Option<FieldName>, String) {
    let parsed = FieldName::new(name.get_ref().clone())
        .map_err(|e| c.err(name.span(), format!("{key}.name"), e.to_string()))
        .ok();
    let key = match &parsed {
        Some(n) => format!("{key}({n})"),
        None => key.to_string(),
    };
    (parsed, key)
}

pub(in crate::profile) fn unit(
    c: &mut Check<'_>,
    key: &str,
    unit: &Spanned<String>,
) -> Option<ProfileUnit> {
    let parsed = ProfileUnit::parse(unit.get_ref());
    if parsed.is_none() {
        c.err(
            unit.span(),
            format!("{key}.unit"),
            format!(
                "unknown unit {:?}; valid: {}",
                unit.get_ref(),
                ProfileUnit::valid_symbols()
            ),
        );
    }
    parsed
}

/// The scale (default 1); a given one must be finite and non-zero.
pub(in crate::profile) fn scale(c: &mut Check<'_>, key: &str, scale: Option<&Spanned<f64>>) -> f64 {
    let Some(s) = scale else {
        return 1.0;
    };
    let value = *s.get_ref();
    if !value.is_finite() || value == 0.0 {
        c.err(
            s.span(),
            format!("{key}.scale"),
            "scale must be a finite, non-zero number".into(),
        );
    }
    value
}

pub(in crate::profile) fn range(
    c: &mut Check<'_>,
    key: &str,
    range: Option<&Spanned<Vec<f64>>>,
) -> Option<(f64, f64)> {
    let r = range?;
    match r.get_ref().as_slice() {
        [lo, hi] if lo <= hi => Some((*lo, *hi)),
        _ => {
            c.err(
                r.span(),
                format!("{key}.range"),
                "range must be [min, max] with min <= max".into(),
            );
            None
        }
    }
}

/// `counter` ("none" or "monotonic") and its `rollover`, which needs "monotonic".
pub(in crate::profile) fn counter(
    c: &mut Check<'_>,
    key: &str,
    counter: Option<&Spanned<String>>,
    rollover: Option<&Spanned<f64>>,
) -> Counter {
    let parsed = match counter.map(|s| (s.get_ref().as_str(), s.span())) {
        None | Some(("none", _)) => Counter::None,
        Some(("monotonic", _)) => Counter::Monotonic {
            rollover: rollover.map(|r| *r.get_ref()),
        },
        Some((other, span)) => {
            c.err(
                span,
                format!("{key}.counter"),
                format!("unknown counter kind {other:?}; valid: \"none\", \"monotonic\""),
            );
            Counter::None
        }
    };
    if let (Some(r), Counter::None) = (rollover, parsed) {
        c.err(
            r.span(),
            format!("{key}.rollover"),
            "rollover needs counter = \"monotonic\"".into(),
        );
    }
    parsed
}

/// A sentinel written as a hex string (`"0xFFFF_FFFF"`), for patterns above i64::MAX.
pub(in crate::profile) fn hex_sentinel(s: &str) -> Result<u64, String> {
    let digits = s
        .trim_start_matches("0x")
        .trim_start_matches("0X")
        .replace('_', "");
    u64::from_str_radix(&digits, 16)
        .map_err(|_| format!("sentinel {s:?} is not a hex bit pattern like \"0xFFFFFFFF\""))
}

const CATEGORIES: &str = "\"identifier\", \"measurement\", \"status\", \"alarm\"";
const GRADES: &str = "\"L1\", \"L2\", \"L3\", \"L4\"";

/// The field's `category` and `grade`, both required: a field nobody classified cannot be
/// minimised by a purpose. A missing one is reported on the field's `name` line.
pub(in crate::profile) fn classification(
    c: &mut Check<'_>,
    key: &str,
    name: &Spanned<String>,
    category: Option<&Spanned<String>>,
    grade: Option<&Spanned<String>>,
    personal: bool,
) -> Option<Classification> {
    let category = match category.map(|s| (s.get_ref().as_str(), s.span())) {
        Some(("identifier", _)) => Some(Category::Identifier),
        Some(("measurement", _)) => Some(Category::Measurement),
        Some(("status", _)) => Some(Category::Status),
        Some(("alarm", _)) => Some(Category::Alarm),
        other => {
            let (span, message) = match other {
                Some((v, span)) => (span, format!("unknown category {v:?}; valid: {CATEGORIES}")),
                None => (
                    name.span(),
                    format!("missing: every field needs a classification; valid: {CATEGORIES}"),
                ),
            };
            c.err(span, format!("{key}.category"), message);
            None
        }
    };
    let grade = match grade.map(|s| (s.get_ref().as_str(), s.span())) {
        Some(("L1", _)) => Some(Grade::L1),
        Some(("L2", _)) => Some(Grade::L2),
        Some(("L3", _)) => Some(Grade::L3),
        Some(("L4", _)) => Some(Grade::L4),
        other => {
            let (span, message) = match other {
                Some((v, span)) => (span, format!("unknown grade {v:?}; valid: {GRADES} (L1 public .. L4 most sensitive)")),
                None => (
                    name.span(),
                    format!("missing: every field needs a sensitivity grade; valid: {GRADES} (L1 public .. L4 most sensitive)"),
                ),
            };
            c.err(span, format!("{key}.grade"), message);
            None
        }
    };
    Some(Classification {
        category: category?,
        grade: grade?,
        personal,
    })
}

/// `max_rate` (largest plausible change per second, in the field's unit; for a counter,
/// of its increments) and `frozen_after` (this many identical values in a row are
/// suspect). Both need a numeric field; `frozen_after` is refused on counters, where an
/// unchanged total is normal (nothing consumed).
pub(in crate::profile) fn quality_limits(
    c: &mut Check<'_>,
    key: &str,
    numeric: bool,
    counter: Counter,
    max_rate: Option<&Spanned<f64>>,
    frozen_after: Option<&Spanned<u32>>,
) -> (Option<f64>, Option<u32>) {
    if let Some(r) = max_rate {
        if !numeric {
            c.err(
                r.span(),
                format!("{key}.max_rate"),
                "max_rate needs a numeric field, not a flag or text".into(),
            );
        } else if !r.get_ref().is_finite() || *r.get_ref() <= 0.0 {
            c.err(
                r.span(),
                format!("{key}.max_rate"),
                "max_rate must be a finite number > 0 (the field's unit per second)".into(),
            );
        }
    }
    if let Some(n) = frozen_after {
        if !numeric {
            c.err(
                n.span(),
                format!("{key}.frozen_after"),
                "frozen_after needs a numeric field, not a flag or text".into(),
            );
        } else if matches!(counter, Counter::Monotonic { .. }) {
            c.err(
                n.span(),
                format!("{key}.frozen_after"),
                "frozen_after does not apply to a counter: an unchanged total is normal \
                 (nothing consumed); valid on gauges that always move (voltage, frequency)"
                    .into(),
            );
        } else if *n.get_ref() < 2 {
            c.err(
                n.span(),
                format!("{key}.frozen_after"),
                "frozen_after must be at least 2 (identical values in a row)".into(),
            );
        }
    }
    (
        max_rate.map(|r| *r.get_ref()),
        frozen_after.map(|n| *n.get_ref()),
    )
}

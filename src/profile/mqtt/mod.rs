//! Profiles of meters that publish over MQTT (`[meter] protocol = "mqtt"`).
//!
//! Such a profile has an `[mqtt]` section instead of `[modbus]`: the payload shape
//! (`json`, `thingsboard`, `alink`) and, for `json`, where the timestamp is and how it is
//! written. Its `[[field]]`s carry the same attributes as register fields (unit, scale,
//! offset, range, sentinels, counter, category, grade, personal, verified, note) but are
//! located by `pointer` (RFC 6901 JSON pointer, shape `json`) or `key` (telemetry key or
//! Alink property identifier) instead of `register`/`type`; `type` names the JSON value
//! kind. Every field becomes an ordinary [`Field`] (so normalise, check and minimise treat
//! it like any other) plus an [`MqttField`] saying where it is in a payload.
//!
//! Errors are located (`FILE:LINE:COL key: message`) and say what would be valid; the
//! file schema and its validation are in `raw`.

mod raw;

use super::FieldType;
use crate::reading::FieldName;

pub(super) use raw::parse;

/// How a payload is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadShape {
    /// Any JSON document; every field and the timestamp are found by JSON pointer.
    Json,
    /// ThingsBoard device telemetry: `{"k":v}`, `{"ts":ms,"values":{…}}` or an array of
    /// either; fields by key. Also one device's entry of a gateway-API message (routing
    /// by device name is the source's job).
    ThingsBoard,
    /// Alibaba Alink `thing.event.property.post`: `params: {"Prop": {"value": v, "time": ms}}`
    /// or the flat `params: {"Prop": v}`; fields by property identifier.
    Alink,
}

impl PayloadShape {
    pub(crate) const NAMES: &'static str = "\"json\", \"thingsboard\", \"alink\"";

    pub fn as_str(self) -> &'static str {
        match self {
            PayloadShape::Json => "json",
            PayloadShape::ThingsBoard => "thingsboard",
            PayloadShape::Alink => "alink",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(PayloadShape::Json),
            "thingsboard" => Some(PayloadShape::ThingsBoard),
            "alink" => Some(PayloadShape::Alink),
            _ => None,
        }
    }
}

/// How a `json` payload writes its timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeFormat {
    /// Milliseconds since the Unix epoch (number).
    Millis,
    /// Seconds since the Unix epoch (number, fractions allowed).
    Seconds,
    /// An RFC 3339 / ISO 8601 string (`2026-11-23T14:00:00Z`, `…+08:00`, `20261123T140000Z`).
    Iso8601,
}

impl TimeFormat {
    pub(crate) const NAMES: &'static str = "\"ms\", \"s\", \"iso8601\"";
}

/// The JSON kind a field's value has in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Any JSON number; the reading is a float after scaling.
    Number,
    /// A JSON integer (a float with no fraction is accepted); stays an integer when no
    /// scaling applies.
    Integer,
    /// `true`/`false` (also 0/1).
    Bool,
    /// Bit N of an integer flags value (0 = least significant).
    Bit(u8),
    /// A string (identifiers); numbers are accepted and kept as their decimal text.
    Text,
}

impl ValueKind {
    pub(crate) const NAMES: &'static str = "\"number\", \"integer\", \"bool\", \"bit\", \"text\"";

    /// The register type that gives this kind the same normalisation rules.
    pub(crate) fn field_type(self) -> FieldType {
        match self {
            ValueKind::Number => FieldType::F64,
            ValueKind::Integer | ValueKind::Text => FieldType::I64,
            ValueKind::Bool => FieldType::Bit(0),
            ValueKind::Bit(n) => FieldType::Bit(n),
        }
    }
}

/// Where a field is in a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// RFC 6901 JSON pointer into the whole document (shape `json`).
    Pointer(String),
    /// Telemetry key (ThingsBoard) or property identifier (Alink).
    Key(String),
}

impl std::fmt::Display for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Locator::Pointer(p) => write!(f, "pointer {p}"),
            Locator::Key(k) => write!(f, "key {k}"),
        }
    }
}

/// Where and how one profile field is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttField {
    pub name: FieldName,
    pub locator: Locator,
    pub kind: ValueKind,
    /// Absent from some messages by design (e.g. only sent on change): not counted as an
    /// error when missing.
    pub optional: bool,
}

/// The MQTT part of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSpec {
    pub shape: PayloadShape,
    /// JSON pointer to the message timestamp (shape `json` only).
    pub timestamp: Option<String>,
    pub time_format: TimeFormat,
    /// One per profile field, in the same order as `Profile::fields`.
    pub fields: Vec<MqttField>,
}

/// Whether profile text declares `[meter] protocol = "mqtt"` (false if it does not parse:
/// the register parser then reports the syntax error).
pub(super) fn declares_mqtt(text: &str) -> bool {
    text.parse::<toml::Table>().is_ok_and(|t| {
        t.get("meter")
            .and_then(|m| m.get("protocol"))
            .and_then(toml::Value::as_str)
            == Some("mqtt")
    })
}

/// Whether `p` is a well-formed RFC 6901 JSON pointer (`""` or `/a/b`, `~` only as `~0`/`~1`).
pub(crate) fn is_json_pointer(p: &str) -> bool {
    if p.is_empty() {
        return true;
    }
    if !p.starts_with('/') {
        return false;
    }
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return false;
        }
    }
    true
}

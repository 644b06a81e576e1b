//! Payload bytes → named values, by the profile's [`MqttSpec`]. Pure; never panics.
//!
//! A payload is rejected as a whole ([`PayloadError`]) when it is too large, not JSON,
//! not of the profile's shape, or holds none of the profile's fields. Otherwise every
//! field found becomes a [`NamedValue`] typed by the field's [`ValueKind`]; a required
//! field that is absent (or `null`), or a value of the wrong JSON type, becomes a
//! [`FieldError`] and the other fields are still delivered.
//!
//! Timestamps: `json` reads the profile's `timestamp` pointer in its format; `thingsboard`
//! reads `ts` (ms) of each entry; `alink` reads each property's `time` (ms). A value with
//! no timestamp, or an implausible one (see [`super::time::plausible`]), is stamped with
//! the receive time and marked [`TimeSource::Received`].

use serde_json::{Map, Value as Json};

use super::time;
use crate::profile::mqtt::{Locator, MqttField, MqttSpec, PayloadShape, TimeFormat, ValueKind};
use crate::profile::RawValue;
use crate::reading::{FieldName, TimestampMs};
use crate::source::{NamedValue, SourceValue, TimeSource};

/// Largest payload decoded; anything larger is rejected unread.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// The Alink method a property post carries.
pub(crate) const ALINK_PROPERTY_POST: &str = "thing.event.property.post";

/// Why a whole payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload is not {shape} telemetry: {detail}")]
    Shape { shape: &'static str, detail: String },
    #[error("payload holds none of the profile's fields")]
    NoField,
}

/// A problem with one field of an otherwise usable payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("field {field} ({at}) is missing")]
    Missing { field: FieldName, at: String },
    #[error("field {field} ({at}): expected {expected}, found {found}")]
    WrongType {
        field: FieldName,
        at: String,
        expected: &'static str,
        found: String,
    },
}

/// What a usable payload yielded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoded {
    pub values: Vec<NamedValue>,
    pub errors: Vec<FieldError>,
}

/// One object of values with the timestamp that applies to it (if any).
struct Entry<'a> {
    values: &'a Map<String, Json>,
    at_ms: Option<TimestampMs>,
}

/// Decodes one payload received at `received_ms`.
pub fn decode(
    spec: &MqttSpec,
    payload: &[u8],
    received_ms: TimestampMs,
) -> Result<Decoded, PayloadError> {
    let root = parse(payload)?;
    decode_value(spec, &root, received_ms)
}

/// Checks the size and parses JSON.
pub(crate) fn parse(payload: &[u8]) -> Result<Json, PayloadError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(PayloadError::TooLarge(payload.len()));
    }
    serde_json::from_slice(payload).map_err(|e| PayloadError::NotJson(e.to_string()))
}

/// Decodes one already parsed document (a whole payload, or one device's entry of a
/// ThingsBoard gateway-API message).
pub(crate) fn decode_value(
    spec: &MqttSpec,
    root: &Json,
    received_ms: TimestampMs,
) -> Result<Decoded, PayloadError> {
    let stamp = |at: Option<TimestampMs>| match at {
        Some(ms) if time::plausible(ms, received_ms) => (ms, TimeSource::Device),
        _ => (received_ms, TimeSource::Received),
    };
    let mut out = Decoded::default();
    match spec.shape {
        PayloadShape::Json => {
            if !root.is_object() && !root.is_array() {
                return Err(shape_err(spec.shape, "expected a JSON object or array"));
            }
            let at = spec
                .timestamp
                .as_deref()
                .and_then(|p| root.pointer(p))
                .and_then(|t| json_time(t, spec.time_format));
            let (at_ms, time) = stamp(at);
            for f in &spec.fields {
                let Locator::Pointer(p) = &f.locator else {
                    continue;
                };
                push(&mut out, f, root.pointer(p), p, at_ms, time);
            }
        }
        PayloadShape::ThingsBoard => {
            let entries = thingsboard_entries(root)?;
            collect_keyed(&mut out, spec, &entries, |entry, key| {
                (entry.values.get(key), stamp(entry.at_ms))
            });
        }
        PayloadShape::Alink => {
            let params = alink_params(root)?;
            let entries = [Entry {
                values: params,
                at_ms: None,
            }];
            collect_keyed(&mut out, spec, &entries, |entry, key| {
                match entry.values.get(key) {
                    Some(Json::Object(prop)) if prop.contains_key("value") => {
                        let at = prop
                            .get("time")
                            .and_then(|t| json_time(t, TimeFormat::Millis));
                        (prop.get("value"), stamp(at))
                    }
                    other => (other, stamp(None)),
                }
            });
        }
    }
    let only_missing = out
        .errors
        .iter()
        .all(|e| matches!(e, FieldError::Missing { .. }));
    if out.values.is_empty() && only_missing {
        return Err(PayloadError::NoField);
    }
    out.values.sort_by_key(|v| v.at_ms);
    Ok(out)
}

fn shape_err(shape: PayloadShape, detail: impl Into<String>) -> PayloadError {
    PayloadError::Shape {
        shape: shape.as_str(),
        detail: detail.into(),
    }
}

/// `{"k":v}`, `{"ts":ms,"values":{…}}`, or a non-empty array of those.
fn thingsboard_entries(root: &Json) -> Result<Vec<Entry<'_>>, PayloadError> {
    let items: Vec<&Json> = match root {
        Json::Array(a) if a.is_empty() => {
            return Err(shape_err(PayloadShape::ThingsBoard, "empty array"))
        }
        Json::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    items
        .into_iter()
        .map(|item| {
            let Json::Object(obj) = item else {
                return Err(shape_err(
                    PayloadShape::ThingsBoard,
                    format!("expected an object, found {}", kind_name(item)),
                ));
            };
            match (obj.get("ts"), obj.get("values")) {
                (Some(ts), Some(values)) => {
                    let Json::Object(values) = values else {
                        return Err(shape_err(
                            PayloadShape::ThingsBoard,
                            format!("`values` is {}, expected an object", kind_name(values)),
                        ));
                    };
                    let at_ms = json_time(ts, TimeFormat::Millis).ok_or_else(|| {
                        shape_err(PayloadShape::ThingsBoard, "`ts` is not epoch milliseconds")
                    })?;
                    Ok(Entry {
                        values,
                        at_ms: Some(at_ms),
                    })
                }
                _ => Ok(Entry {
                    values: obj,
                    at_ms: None,
                }),
            }
        })
        .collect()
}

/// The `params` object of an Alink property post.
fn alink_params(root: &Json) -> Result<&Map<String, Json>, PayloadError> {
    let Json::Object(obj) = root else {
        return Err(shape_err(
            PayloadShape::Alink,
            format!("expected an object, found {}", kind_name(root)),
        ));
    };
    match obj.get("method") {
        None => {}
        Some(Json::String(m)) if m == ALINK_PROPERTY_POST => {}
        Some(other) => {
            return Err(shape_err(
                PayloadShape::Alink,
                // The value itself is not repeated: it is the meter's text (issue 12).
                format!(
                    "method ({}) is not \"{ALINK_PROPERTY_POST}\"",
                    kind_name(other)
                ),
            ));
        }
    }
    match obj.get("params") {
        Some(Json::Object(params)) => Ok(params),
        Some(other) => Err(shape_err(
            PayloadShape::Alink,
            format!("`params` is {}, expected an object", kind_name(other)),
        )),
        None => Err(shape_err(PayloadShape::Alink, "no `params` object")),
    }
}

/// Looks every keyed field up in every entry; a field is missing only if no entry has it.
fn collect_keyed<'a>(
    out: &mut Decoded,
    spec: &MqttSpec,
    entries: &[Entry<'a>],
    lookup: impl Fn(&Entry<'a>, &str) -> (Option<&'a Json>, (TimestampMs, TimeSource)),
) {
    for f in &spec.fields {
        let Locator::Key(key) = &f.locator else {
            continue;
        };
        let mut found = false;
        for entry in entries {
            let (value, (at_ms, time)) = lookup(entry, key);
            if value.is_some_and(|v| !v.is_null()) {
                found = true;
                push(out, f, value, key, at_ms, time);
            }
        }
        if !found {
            push(out, f, None, key, 0, TimeSource::Received);
        }
    }
}

/// Converts one located value (or its absence) into a named value or a field error.
fn push(
    out: &mut Decoded,
    f: &MqttField,
    value: Option<&Json>,
    at: &str,
    at_ms: TimestampMs,
    time: TimeSource,
) {
    match value {
        None | Some(Json::Null) => {
            if !f.optional {
                out.errors.push(FieldError::Missing {
                    field: f.name.clone(),
                    at: at.to_owned(),
                });
            }
        }
        Some(v) => match typed(f.kind, v) {
            Some(value) => out.values.push(NamedValue {
                field: f.name.clone(),
                value,
                at_ms,
                time,
            }),
            None => out.errors.push(FieldError::WrongType {
                field: f.name.clone(),
                at: at.to_owned(),
                expected: kind_expected(f.kind),
                found: kind_name(v).to_owned(),
            }),
        },
    }
}

/// A JSON value as the field's kind, if it is one.
pub(crate) fn typed(kind: ValueKind, v: &Json) -> Option<SourceValue> {
    let integer = |v: &Json| -> Option<RawValue> {
        if let Some(i) = v.as_i64() {
            return Some(RawValue::Signed(i));
        }
        if let Some(u) = v.as_u64() {
            return Some(RawValue::Unsigned(u));
        }
        let f = v.as_f64()?;
        (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(RawValue::Signed(f as i64))
    };
    let raw = match kind {
        ValueKind::Number => {
            let Json::Number(_) = v else { return None };
            integer(v).or_else(|| v.as_f64().map(RawValue::Float))?
        }
        ValueKind::Integer => integer(v)?,
        ValueKind::Bool => match v {
            Json::Bool(b) => RawValue::Bit(*b),
            _ => match integer(v)? {
                RawValue::Signed(0) | RawValue::Unsigned(0) => RawValue::Bit(false),
                RawValue::Signed(1) | RawValue::Unsigned(1) => RawValue::Bit(true),
                _ => return None,
            },
        },
        ValueKind::Bit(n) => {
            let bits = match integer(v)? {
                RawValue::Signed(i) => i as u64,
                RawValue::Unsigned(u) => u,
                _ => return None,
            };
            RawValue::Bit((bits >> n) & 1 == 1)
        }
        ValueKind::Text => {
            return match v {
                Json::String(s) => Some(SourceValue::Text(s.clone())),
                Json::Number(n) => Some(SourceValue::Text(n.to_string())),
                _ => None,
            }
        }
    };
    Some(SourceValue::Raw(raw))
}

/// A JSON timestamp in `format` as epoch milliseconds (numbers for ms/s; strings for
/// ISO 8601, and numeric strings for ms/s as some platforms quote them).
fn json_time(t: &Json, format: TimeFormat) -> Option<TimestampMs> {
    match (t, format) {
        (Json::Number(n), TimeFormat::Millis | TimeFormat::Seconds) => {
            time::from_number(n.as_f64()?, format == TimeFormat::Seconds)
        }
        (Json::String(s), TimeFormat::Millis | TimeFormat::Seconds) => {
            time::from_number(s.trim().parse().ok()?, format == TimeFormat::Seconds)
        }
        (Json::String(s), TimeFormat::Iso8601) => time::parse_iso8601(s),
        _ => None,
    }
}

fn kind_expected(kind: ValueKind) -> &'static str {
    match kind {
        ValueKind::Number => "a number",
        ValueKind::Integer | ValueKind::Bit(_) => "an integer",
        ValueKind::Bool => "true/false or 0/1",
        ValueKind::Text => "a string",
    }
}

fn kind_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(n) if n.is_f64() => "a fractional number",
        Json::Number(_) => "an integer",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;

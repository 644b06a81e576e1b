//! Domain types that flow between the pipeline stages.
//!
//! A source produces raw register images; `transform::normalise` turns them into
//! [`Reading`]s (typed value, canonical [`Unit`], [`Quality`], [`Classification`]);
//! `transform::minimise` turns the readings a purpose needs into [`Record`]s, the only
//! thing that ever leaves the box. Identifiers are newtypes that can only be built
//! through their validating constructors, so past the config boundary an invalid id
//! cannot exist.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod stream;
pub use stream::Stream;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(String);

fn check_ident(kind: &str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() || s.len() > max {
        return Err(IdError(format!(
            "{kind} must be 1..={max} characters, got {}",
            s.len()
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError(format!(
            "{kind} {s:?} contains {c:?}; valid characters are ASCII letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

macro_rules! ident_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an identifier.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_ident($kind, &s, $max)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

ident_newtype!(
    /// A device as the operator names it in the gateway config. Never leaves the box in
    /// clear: records carry its keyed pseudonym.
    DeviceId,
    "device id",
    64
);
ident_newtype!(
    /// The gateway's identity, as registered at the hub.
    GatewayId,
    "gateway id",
    64
);
ident_newtype!(
    /// The name of a purpose (a policy's `purpose`), such as `billing`: carried in every
    /// version 3 envelope header and approved per gateway at the hub.
    PurposeName,
    "purpose name",
    64
);
ident_newtype!(
    /// A canonical field name such as `energy_import` or `voltage_l1`.
    FieldName,
    "field name",
    64
);

ident_newtype!(
    /// A group of devices a policy may aggregate over (a feeder, district or building), as
    /// the operator names it. Leaves the box in clear as the subject `area:<name>` of area
    /// aggregates, which are suppressed when they cover too few devices.
    AreaId,
    "area",
    64
);

/// A Modbus unit (slave) id, 1..=247 on a bus; 0 is broadcast and 248..=255 reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UnitId(pub u8);

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A zero-based Modbus register address as it goes on the wire (the profile's
/// `address_base` has already been applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RegisterAddress(pub u16);

impl fmt::Display for RegisterAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Milliseconds since the Unix epoch, UTC.
pub(crate) type TimestampMs = i64;

/// Current wall-clock time in UTC milliseconds.
pub fn now_ms() -> TimestampMs {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A canonical unit. Profiles may name other units (`kW`, `kWh`, `L`); normalisation
/// converts them exactly into one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Watt,
    WattHour,
    Var,
    VarHour,
    VoltAmpere,
    Volt,
    Ampere,
    Hertz,
    CubicMetre,
    CubicMetrePerHour,
    Celsius,
    Percent,
    Pascal,
    Second,
    /// Dimensionless: power factor, ratios, counts, status words and flags.
    One,
}

impl Unit {
    pub(crate) const ALL: [Unit; 15] = [
        Unit::Watt,
        Unit::WattHour,
        Unit::Var,
        Unit::VarHour,
        Unit::VoltAmpere,
        Unit::Volt,
        Unit::Ampere,
        Unit::Hertz,
        Unit::CubicMetre,
        Unit::CubicMetrePerHour,
        Unit::Celsius,
        Unit::Percent,
        Unit::Pascal,
        Unit::Second,
        Unit::One,
    ];

    /// The symbol used on the wire, in JSON and in `check` output.
    pub fn symbol(self) -> &'static str {
        match self {
            Unit::Watt => "W",
            Unit::WattHour => "Wh",
            Unit::Var => "var",
            Unit::VarHour => "varh",
            Unit::VoltAmpere => "VA",
            Unit::Volt => "V",
            Unit::Ampere => "A",
            Unit::Hertz => "Hz",
            Unit::CubicMetre => "m3",
            Unit::CubicMetrePerHour => "m3/h",
            Unit::Celsius => "degC",
            Unit::Percent => "%",
            Unit::Pascal => "Pa",
            Unit::Second => "s",
            Unit::One => "1",
        }
    }

    pub(crate) fn from_symbol(s: &str) -> Option<Self> {
        Unit::ALL.into_iter().find(|u| u.symbol() == s)
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

impl Serialize for Unit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.symbol())
    }
}

impl<'de> Deserialize<'de> for Unit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Unit::from_symbol(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown canonical unit {s:?}")))
    }
}

/// A typed value. Integers stay integers when no scaling applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Pseudonyms and text identifiers.
    Text(String),
}

impl Value {
    /// The value as a float, for range checks and counters; `None` for text.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Text(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// Why a reading is not fully trusted. Checks flag, they never rewrite the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QualityReason {
    /// Outside the profile's valid range.
    OutOfRange,
    /// The meter answered with its "not available" sentinel.
    NotAvailable,
    /// A monotonic counter went backwards (meter replaced, reset or misread).
    CounterBackwards,
    /// A counter wrapped at its declared rollover.
    CounterRollover,
    /// The float is NaN or infinite.
    NotFinite,
    /// The meter sent no usable timestamp: the time is the gateway's receive time.
    ReceiveTime,
    /// The meter's timestamp is ahead of the gateway's clock by more than allowed, or
    /// behind it by more than allowed; it is kept as sent.
    ClockSkew,
    /// The change from the previous good reading is faster than the profile's
    /// `max_rate` (for a counter: the increment).
    Spike,
    /// The same value `frozen_after` times in a row on a field that always moves: a
    /// stuck sensor or a meter repeating its last value.
    Frozen,
    /// A counter fell to near zero: the meter was replaced or reset (not a misread
    /// backwards step, not a rollover).
    CounterReset,
}

impl QualityReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QualityReason::OutOfRange => "out_of_range",
            QualityReason::NotAvailable => "not_available",
            QualityReason::CounterBackwards => "counter_backwards",
            QualityReason::CounterRollover => "counter_rollover",
            QualityReason::NotFinite => "not_finite",
            QualityReason::ReceiveTime => "receive_time",
            QualityReason::ClockSkew => "clock_skew",
            QualityReason::Spike => "spike",
            QualityReason::Frozen => "frozen",
            QualityReason::CounterReset => "counter_reset",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    #[default]
    Good,
    Uncertain(QualityReason),
    Bad(QualityReason),
}

impl Quality {
    fn rank(self) -> u8 {
        match self {
            Quality::Good => 0,
            Quality::Uncertain(_) => 1,
            Quality::Bad(_) => 2,
        }
    }

    /// The worse of two qualities (the first wins a tie).
    pub(crate) fn worst(self, other: Quality) -> Quality {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quality::Good => f.write_str("good"),
            Quality::Uncertain(r) => write!(f, "uncertain({})", r.as_str()),
            Quality::Bad(r) => write!(f, "bad({})", r.as_str()),
        }
    }
}

/// Data category of a profile field (GB/T 43697 style classification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Serial numbers, meter addresses, account or household numbers.
    Identifier,
    Measurement,
    Status,
    Alarm,
}

/// Sensitivity grade, L1 (public) to L4 (most sensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Grade {
    L1,
    L2,
    L3,
    L4,
}

/// A field's classification, carried from its profile onto every reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Classification {
    pub category: Category,
    pub grade: Grade,
    /// Personal information (PIPL): leaves the box only as a keyed pseudonym.
    pub personal: bool,
}

impl Classification {
    /// Whether values of this field identify a person or device and must leave the box
    /// only as keyed pseudonyms: identifiers always, and personal fields other than
    /// measurements (account numbers, household codes). A personal *measurement* (a
    /// household's consumption) keeps its value — pseudonymising a number destroys it —
    /// and is de-identified through the record's pseudonymous subject instead.
    pub fn is_identifying(&self) -> bool {
        self.category == Category::Identifier
            || (self.personal && self.category != Category::Measurement)
    }

    /// The stream a field of this classification travels on.
    pub fn stream(&self) -> Stream {
        if self.category == Category::Alarm {
            Stream::Alarms
        } else {
            Stream::Readings
        }
    }
}

/// One decoded, checked value from one device, still inside the box.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: DeviceId,
    pub field: FieldName,
    pub value: Value,
    pub unit: Unit,
    pub at_ms: TimestampMs,
    pub quality: Quality,
    pub class: Classification,
}

/// How an aggregate combines the samples of its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggFn {
    Sum,
    Mean,
    Min,
    Max,
    /// The latest sample in the window.
    Last,
    /// A counter's increase over the window, with resets and rollovers accounted for.
    Delta,
}

impl AggFn {
    /// The name used in policies, in the hub sink and in `check` output.
    pub fn as_str(self) -> &'static str {
        match self {
            AggFn::Sum => "sum",
            AggFn::Mean => "mean",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Last => "last",
            AggFn::Delta => "delta",
        }
    }
}

impl fmt::Display for AggFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The time window an aggregate record covers: samples with `start_ms <= at < end_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    pub function: AggFn,
    /// Inclusive start, ms since the Unix epoch, UTC.
    pub start_ms: TimestampMs,
    /// Exclusive end, ms since the Unix epoch, UTC.
    pub end_ms: TimestampMs,
    /// How many readings the aggregate covers.
    pub samples: u32,
    /// How many distinct devices contributed (1 for a per-device aggregate).
    pub devices: u32,
    /// The window is not fully covered: the gateway started, stopped or missed polls inside
    /// it, so the value describes only part of it.
    pub partial: bool,
}

/// What leaves the box after minimisation. Serialised with bincode 2 (standard config)
/// inside sealed batches; see `seal` for the wire format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The device's keyed pseudonym (`p-` + 32 hex digits).
    pub subject: String,
    pub field: String,
    pub value: Value,
    pub unit: Unit,
    pub at_ms: TimestampMs,
    pub quality: Quality,
    /// Free-form tags such as `emergency`.
    pub tags: Vec<String>,
    /// Set on aggregates: the window and function the value summarises. `None` for a single
    /// reading, whose time is `at_ms`; an aggregate's `at_ms` is its window's start.
    pub window: Option<Window>,
    /// The pseudonym key epoch `subject` (and any pseudonymised value) was made under, so the
    /// hub can tell key periods apart. 0 = before key epochs existed.
    pub epoch: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_reject_bad_characters_and_lengths() {
        assert!(DeviceId::new("flat-12.meter_a").is_ok());
        assert!(DeviceId::new("").is_err());
        assert!(DeviceId::new("a b").is_err());
        assert!(DeviceId::new("x".repeat(65)).is_err());
        let err = GatewayId::new("gw/1").unwrap_err().to_string();
        assert!(err.contains("'/'"), "{err}");
    }

    #[test]
    fn stream_codes_round_trip() {
        for s in Stream::ALL {
            assert_eq!(Stream::from_code(s.code()), Some(s));
        }
        assert_eq!(Stream::from_code(Stream::COUNT as u8), None);
        for i in 0..Stream::MAX_FLOWS {
            let s = Stream::flow(i).unwrap();
            assert_eq!(s.flow_index(), Some(i));
            assert!(!s.is_priority());
            assert_eq!(Stream::from_name(s.as_str()), Some(s));
        }
        assert_eq!(Stream::flow(Stream::MAX_FLOWS), None);
        assert!(Stream::Alarms.is_priority() && Stream::Audit.is_priority());
        assert_eq!(
            serde_json::to_string(&Stream::flow(3).unwrap()).unwrap(),
            "\"readings-3\""
        );
    }

    #[test]
    fn unit_symbols_round_trip() {
        for u in Unit::ALL {
            assert_eq!(Unit::from_symbol(u.symbol()), Some(u));
        }
    }

    #[test]
    fn worst_quality_wins() {
        let g = Quality::Good;
        let u = Quality::Uncertain(QualityReason::CounterBackwards);
        let b = Quality::Bad(QualityReason::OutOfRange);
        assert_eq!(g.worst(u), u);
        assert_eq!(u.worst(b), b);
        assert_eq!(b.worst(u), b);
    }
}

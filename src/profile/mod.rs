//! Device profiles: what a meter model's registers mean.
//!
//! One TOML file per meter model/firmware in `firmware-profiles/`, named by its file
//! stem (`firmware-profiles/chint-ddsu666.toml` is profile `chint-ddsu666`). A profile
//! is parsed (`raw`) and validated once into the types here: past loading, a field
//! always has a wire address, a type whose width is known, a unit that converts to a
//! canonical one and a classification. Validation rejects overlapping registers,
//! type/width mismatches, unknown units and impossible ranges, with `FILE:LINE` errors.
//!
//! Meters that publish over MQTT have profiles with `protocol = "mqtt"` (see [`mqtt`]):
//! their fields are the same validated [`Field`]s, located in a payload instead of a
//! register map.
//!
//! The file format is documented in README.md ("Device profiles").

pub(crate) mod decimal;
pub mod decode;
pub(crate) mod line;
pub mod mqtt;
mod raw;
pub(crate) mod units;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::diag::Diagnostic;
use crate::reading::{Classification, FieldName, RegisterAddress, Stream, Unit};

pub use decode::{FieldType, RawValue, WordOrder};
pub(crate) use units::ProfileUnit;

/// Largest number of registers one FC03/FC04 request may carry (Modbus spec).
pub(crate) const MAX_REGISTERS_PER_READ: u16 = 125;
/// Default largest run of unused registers the read planner fills to merge two reads.
pub(crate) const DEFAULT_MAX_GAP_REGISTERS: u16 = 16;

/// Modbus read function used for every field of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FunctionCode {
    /// FC03
    ReadHolding,
    /// FC04
    ReadInput,
}

impl FunctionCode {
    pub(crate) fn code(self) -> u8 {
        match self {
            FunctionCode::ReadHolding => 3,
            FunctionCode::ReadInput => 4,
        }
    }
}

/// Serial line parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// Default serial line settings of a meter model (used by RTU transports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LineSettings {
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
}

/// Counter semantics of a field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Counter {
    /// A gauge: any change is plausible.
    None,
    /// Never decreases, except by wrapping at `rollover` (engineering units) if given.
    Monotonic { rollover: Option<f64> },
}

/// Which instrument-transformer ratio turns a secondary-side value into a primary one.
///
/// CT/PT-connected meters report what their terminals see; the gateway multiplies by
/// the device's configured ratios (`ct_ratio`, `pt_ratio` in `[[device]]`): currents by
/// CT, voltages by PT, powers and energies by CT × PT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ratio {
    Ct,
    Pt,
    CtPt,
}

impl Ratio {
    pub(crate) const NAMES: &'static str = "\"ct\", \"pt\", \"ct_pt\"";

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ct" => Ratio::Ct,
            "pt" => Ratio::Pt,
            "ct_pt" => Ratio::CtPt,
            _ => return None,
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Ratio::Ct => "ct",
            Ratio::Pt => "pt",
            Ratio::CtPt => "ct_pt",
        }
    }

    /// Whether values in canonical unit `unit` scale with this ratio: CT for amperes,
    /// PT for volts, CT × PT for power and energy.
    pub(crate) fn applies_to(self, unit: Unit) -> bool {
        match self {
            Ratio::Ct => unit == Unit::Ampere,
            Ratio::Pt => unit == Unit::Volt,
            Ratio::CtPt => matches!(
                unit,
                Unit::Watt | Unit::WattHour | Unit::Var | Unit::VarHour | Unit::VoltAmpere
            ),
        }
    }

    /// The canonical units this ratio may apply to, for error messages.
    pub(crate) fn valid_units(self) -> &'static str {
        match self {
            Ratio::Ct => "A (currents)",
            Ratio::Pt => "V (voltages)",
            Ratio::CtPt => "W, Wh, var, varh, VA (powers and energies)",
        }
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device's instrument-transformer ratios (1 and 1 for a direct-connected meter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    pub ct: f64,
    pub pt: f64,
}

impl Default for Ratios {
    fn default() -> Self {
        Self::UNITY
    }
}

impl Ratios {
    pub const UNITY: Ratios = Ratios { ct: 1.0, pt: 1.0 };

    /// What a field's secondary-side value is multiplied by (1 without a `ratio`).
    pub fn multiplier(&self, ratio: Option<Ratio>) -> f64 {
        match ratio {
            None => 1.0,
            Some(Ratio::Ct) => self.ct,
            Some(Ratio::Pt) => self.pt,
            Some(Ratio::CtPt) => self.ct * self.pt,
        }
    }
}

/// The second register part of a combined total: `total = integer part + fraction`,
/// both in the field's unit before `scale`/`offset` (a TUF-2000M totaliser is an i32
/// LONG integer part plus an f32 REAL4 fraction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction {
    /// The register number as written in the profile.
    pub register: u32,
    pub address: RegisterAddress,
    pub ty: FieldType,
}

/// One validated profile field.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: FieldName,
    /// The register number as written in the profile (documentation convention).
    pub register: u32,
    /// The zero-based address sent on the wire.
    pub address: RegisterAddress,
    pub ty: FieldType,
    pub order: WordOrder,
    /// engineering = raw × scale + offset, in `unit`.
    pub scale: f64,
    pub offset: f64,
    pub unit: ProfileUnit,
    /// Valid engineering range (inclusive, in `unit`).
    pub range: Option<(f64, f64)>,
    /// Raw register bit patterns that mean "not available".
    pub sentinels: Vec<u64>,
    pub counter: Counter,
    /// Largest plausible change per second (profile unit, meter side; for a counter, of
    /// its increments): a faster one is `uncertain(spike)`.
    pub max_rate: Option<f64>,
    /// This many identical values in a row, and any after, are `uncertain(frozen)`
    /// (gauges that always jitter; never a counter).
    pub frozen_after: Option<u32>,
    /// For a combined total: the fraction part added to the value of `ty` at `address`.
    pub fraction: Option<Fraction>,
    /// The transformer ratio a secondary-side value is multiplied by, if any.
    pub ratio: Option<Ratio>,
    /// The stream the field's readings travel on: `alarms` for alarm and tamper bits
    /// (sent when they change and at least every `batch.alarm_state_every`), else
    /// `readings`.
    pub stream: Stream,
    pub class: Classification,
    /// False where the reference marks the register unverified on real hardware.
    pub verified: bool,
    pub note: Option<String>,
}

impl Field {
    /// Width in registers of the (integer) part at `address`.
    pub fn words(&self) -> u16 {
        self.ty.words()
    }

    /// Every register range the field's value is made of: its own, and a fraction's.
    pub fn parts(&self) -> impl Iterator<Item = (RegisterAddress, FieldType)> + '_ {
        std::iter::once((self.address, self.ty)).chain(self.fraction.map(|f| (f.address, f.ty)))
    }

    /// The smallest run of registers holding every part: what one read must cover so
    /// the parts of a combined total cannot tear.
    pub(crate) fn span(&self) -> (RegisterAddress, u16) {
        Self::span_of(self.parts())
    }

    /// The smallest run of registers holding every `(address, type)` part.
    pub(crate) fn span_of(
        parts: impl IntoIterator<Item = (RegisterAddress, FieldType)>,
    ) -> (RegisterAddress, u16) {
        let (mut start, mut end) = (u32::MAX, 0u32);
        for (a, t) in parts {
            start = start.min(u32::from(a.0));
            end = end.max(u32::from(a.0) + u32::from(t.words()));
        }
        if start > end {
            return (RegisterAddress(0), 0);
        }
        (
            RegisterAddress(u16::try_from(start).unwrap_or(u16::MAX)),
            u16::try_from(end - start).unwrap_or(u16::MAX),
        )
    }

    /// True when the decoded value is an integer that scaling leaves an integer.
    pub(crate) fn keeps_integer(&self) -> bool {
        self.ty.is_integer()
            && self.fraction.is_none()
            && self.ratio.is_none()
            && self.scale == 1.0
            && self.offset == 0.0
            && self.unit.factor == 1.0
    }
}

/// A validated device profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub path: PathBuf,
    pub vendor: String,
    pub model: String,
    pub firmware: Option<String>,
    pub description: Option<String>,
    pub function: FunctionCode,
    pub address_base: u16,
    pub max_gap_registers: u16,
    pub max_registers_per_read: u16,
    pub line: Option<LineSettings>,
    pub fields: Vec<Field>,
    /// First 8 bytes of SHA-256 over the file, hex: names the profile version in batches.
    pub version: String,
    /// Payload shape and field locations of a meter that publishes over MQTT; `None` for
    /// register (Modbus) profiles, whose `function`, `address_base` and field registers
    /// are then meaningless.
    pub mqtt: Option<mqtt::MqttSpec>,
}

impl Profile {
    /// Loads and validates one profile file.
    pub fn load(path: &Path) -> Result<Profile, Vec<Diagnostic>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                col: 0,
                key: String::new(),
                message: format!("cannot read profile: {e}"),
            }]
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates profile text; `path`'s stem names the profile.
    pub fn parse(path: &Path, text: &str) -> Result<Profile, Vec<Diagnostic>> {
        if mqtt::declares_mqtt(text) {
            mqtt::parse(path, text)
        } else {
            raw::parse(path, text)
        }
    }

    /// Whether the meter publishes over MQTT instead of being polled for registers.
    pub fn is_mqtt(&self) -> bool {
        self.mqtt.is_some()
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name.as_str() == name)
    }
}

/// All profiles of a directory, by name.
#[derive(Debug, Clone, Default)]
pub struct ProfileSet {
    profiles: BTreeMap<String, Arc<Profile>>,
}

impl ProfileSet {
    /// Loads every `*.toml` in `dir`. All errors of all files are returned together.
    pub fn load_dir(dir: &Path) -> Result<ProfileSet, Vec<Diagnostic>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            vec![Diagnostic {
                file: dir.to_path_buf(),
                line: 0,
                col: 0,
                key: String::new(),
                message: format!("cannot read profile directory: {e}"),
            }]
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut set = ProfileSet::default();
        let mut errors = Vec::new();
        for path in paths {
            match Profile::load(&path) {
                Ok(p) => {
                    set.profiles.insert(p.name.clone(), Arc::new(p));
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }

    pub fn insert(&mut self, profile: Profile) {
        self.profiles
            .insert(profile.name.clone(), Arc::new(profile));
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Profile>> {
        self.profiles.get(name)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.profiles.values()
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }
}
/// The canonical field names citygate knows: every field of the shipped profiles (a test
/// keeps the list complete). Policies shared between deployments name fields from it, so a
/// rule for a field that this box's profiles lack is fine, while a name in neither is a typo.
pub const KNOWN_FIELDS: &[&str] = &[
    "active_power",
    "active_power_l1",
    "active_power_l2",
    "active_power_l3",
    "alarm_flags",
    "apparent_power",
    "battery_low",
    "battery_voltage",
    "ct_ratio",
    "current_l1",
    "current_l2",
    "current_l3",
    "energy_combined",
    "energy_export",
    "energy_export_l1",
    "energy_export_l2",
    "energy_export_l3",
    "energy_import",
    "energy_import_l1",
    "energy_import_l2",
    "energy_import_l3",
    "firmware_version",
    "flow_rate",
    "flow_unit_code",
    "frequency",
    "meter_address",
    "no_signal",
    "pipe_status",
    "power_factor",
    "power_factor_l1",
    "power_factor_l2",
    "power_factor_l3",
    "pressure",
    "pt_ratio",
    "reactive_energy_combined",
    "reactive_energy_export",
    "reactive_energy_import",
    "reactive_power",
    "remaining_volume",
    "serial_number",
    "signal_quality",
    "signal_weak",
    "temp_sensor_fault",
    "totaliser_multiplier_code",
    "totaliser_unit_code",
    "valve_abnormal",
    "valve_closed",
    "valve_fault",
    "valve_open",
    "valve_state",
    "voltage_l1",
    "voltage_l2",
    "voltage_l3",
    "voltage_ll_12",
    "voltage_ll_23",
    "voltage_ll_31",
    "volume_forward",
    "volume_net",
    "volume_reverse",
    "water_temp",
    "water_temp_t1",
    "water_temp_t2",
    "working_time",
];

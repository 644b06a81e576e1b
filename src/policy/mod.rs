//! Purpose policies: what leaves the box, for which purpose, in which form.
//!
//! A policy file (`config/policies/<name>.toml`) declares one purpose — its legal basis,
//! owner and how long the hub keeps its records — and rules that say, per field or per
//! classification, what leaves. It is parsed once into a [`CompiledPolicy`] (immutable,
//! shared) and drives one stateful [`Engine`] per flow, which turns checked
//! [`Reading`](crate::reading::Reading)s into outbound [`Record`](crate::reading::Record)s.
//! Pure: no tokio, no I/O except reading the file in [`CompiledPolicy::load`].
//!
//! ```toml
//! [purpose]
//! name = "leak-detection"                  # letters, digits, '-', '_', '.'
//! description = "Find leaks from hourly flow and the night-time minimum"
//! legal_basis = "Water supply contract §7; municipal water-loss programme"
//! owner = "Water utility, network operations"
//! retention = "90d"                        # how long the hub keeps these records
//!
//! [[rule]]                                 # hourly volume used, per pseudonymous meter
//! field = "volume_forward"
//! action = "aggregate"
//! function = "delta"                       # sum | mean | min | max | last | delta
//! window = "1h"                            # divides a day; aligned to local midnight
//!
//! [[rule]]                                 # several rules may name one field
//! field = "flow_rate"
//! action = "aggregate"
//! function = "min"
//! window = "1d"
//! hours = "01:00-05:00"                    # only samples at these local times
//!
//! [[rule]]                                 # 15-min area total: k-anonymous
//! field = "flow_rate"
//! action = "aggregate"
//! function = "mean"
//! window = "15m"
//! over = "area"                            # across the devices of the device's area
//! across = "sum"                           # sum | mean | min | max (default sum)
//! k = 5                                    # fewer contributing devices: suppressed
//!
//! [[rule]]
//! field = "water_temp_t1"
//! action = "generalise"
//! step = 0.5                               # or buckets = [0, 10, 20]; and/or time_step = "15m"
//!
//! [[rule]]                                 # rules by classification
//! category = "identifier"                  # and/or grade = "L3", personal = true
//! action = "pseudonymise"
//! ```
//!
//! ## Resolution
//!
//! Every field rule naming a field applies (one field may leave in several forms). If no
//! field rule names it, the first class rule in file order whose `category`, `grade` and
//! `personal` all match the field's classification applies. Otherwise the field is
//! **dropped (default deny)**; `action = "drop"` denies explicitly. Two guards hold even
//! where `check` was skipped: identifying fields (`Classification::is_identifying`) leave
//! only pseudonymised, and L4 personal fields leave per device (`pass`, `generalise`,
//! per-device `aggregate`) only with an `override_reason`; a rule that would break either
//! drops the field instead. `check` reports those rules as errors
//! ([`CompiledPolicy::check_against`]), with non-numeric fields under a numeric action and
//! `delta` on a field that is not a counter.
//!
//! ## Forms
//!
//! - `pass`: value as read. `pseudonymise`: `p-…` keyed pseudonym of the value.
//! - `generalise`: `step` rounds to the nearest multiple of the step (never finer);
//!   `buckets = [e0, e1, …]` replaces the value by the text label of its half-open bucket,
//!   `"[-inf,e0)"`, `"[e0,e1)"`, …, `"[en,inf)"`; `time_step` floors the timestamp to
//!   its civil step (aligned to local midnight like windows).
//! - `aggregate`: one record per window (see `window` for alignment and DST days), at the
//!   window's start, with `window = Some(..)`: function, bounds, samples covered, devices,
//!   partial (shutdown) flag, and the worst quality of the samples covered. Samples with
//!   bad quality are not folded (they are not measurements; counted in
//!   [`EngineStats::bad_excluded`]). Integer inputs give integer sums, minima, maxima,
//!   last values and deltas; a mean is a float.
//! - Counters (`delta`): a window's delta is the sum of the increments between
//!   consecutive samples whose later sample falls in the window. The increment from the
//!   previous window's last sample to this window's first is counted once, in this
//!   window, so deltas of consecutive windows add up to the total. A value below its
//!   predecessor is a rollover when the profile declares `rollover = r` and the counter
//!   was near it (previous > 0.9 r, value < 0.1 r; the checker's rule): the increment is
//!   `r - prev + v`. Otherwise it is a reset (meter replaced): the increment is `v` and
//!   the window's quality becomes uncertain (`counter_backwards`). Never negative, never
//!   averaged away. The first sample a flow sees of a counter is its baseline.
//! - Area aggregates (`over = "area"`): each device's window value (the `function`), then
//!   `across` over the devices of the area that reported in the window. Subject
//!   `area:<area>`; the record's `window.function` is the per-device function, and it
//!   carries the tag `across=<fn>`. An aggregate covering fewer than `k` devices is
//!   suppressed (counted). Devices without an area do not contribute (counted).
//!
//! ## Closing windows and late samples
//!
//! A device's window closes when a later reading of the same device falls in a later
//! window, or when [`Engine::close_due`] is called with a `now` at least [`LATENESS_MS`]
//! past its end (readings still in flight: polls in progress, MQTT publishes). Area
//! windows close only by `close_due`. A sample for a window that has closed, or (for
//! `delta`) older than the counter's last sample, is counted as late and not folded: a
//! sample is never counted in two windows. [`Engine::flush_partial`] pushes every open
//! window, marked partial, at shutdown.

mod check;
mod engine;
mod fold;
mod form;
pub(crate) mod pseudonym;
mod raw;
mod rule;
mod window;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use sha2::{Digest, Sha256};

use crate::diag::Diagnostic;
use crate::reading::{Classification, DeviceId, FieldName, Value};
use crate::seal::PseudonymKey;

pub use engine::{DeviceCtx, Engine, EngineState, EngineStats, LATENESS_MS};
pub use rule::{
    Across, Action, Aggregate, Generalise, Group, Loc, Rule, Selector, ValueStep, DEFAULT_K,
};
pub use window::{DayDivision, Hours};

/// The declared purpose of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurposeMeta {
    pub name: String,
    pub description: String,
    pub legal_basis: String,
    pub owner: String,
    /// How long the hub keeps records of this purpose.
    pub retention: Duration,
}

/// Why a field gets a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A field rule names the field.
    FieldRule,
    /// No field rule names it; the first matching class rule applies.
    ClassRule,
    /// No rule applies: what the policy does not name does not leave.
    DefaultDeny,
    /// The rule would send an identifying field other than as a pseudonym: dropped.
    Identifying,
    /// The rule would send an L4 personal field per device without an override: dropped.
    L4NeedsOverride,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::FieldRule => "field rule",
            Why::ClassRule => "class rule",
            Why::DefaultDeny => "default deny",
            Why::Identifying => "identifying field: pseudonymise or drop only",
            Why::L4NeedsOverride => "L4 personal field: per-device output needs override_reason",
        })
    }
}

/// What happens to one field under one rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What the engine does (`Drop` for default deny and for refused rules).
    pub action: Action,
    /// The rule's index in the file, if a rule applies.
    pub rule: Option<usize>,
    /// The line of the rule's `action` key.
    pub line: Option<usize>,
    pub why: Why,
}

/// A validated policy with its time zone and pseudonym key (and so the key's epoch).
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    meta: PurposeMeta,
    rules: Vec<Rule>,
    file: std::path::PathBuf,
    tz: TimeZone,
    key: PseudonymKey,
}

impl CompiledPolicy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path, tz: TimeZone, key: PseudonymKey) -> Result<Self, Vec<Diagnostic>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                col: 0,
                key: String::new(),
                message: format!("cannot read policy: {e}"),
            }]
        })?;
        Self::parse(path, &text, tz, key)
    }

    /// Validates policy text; `path` names it in errors. Records carry `key`'s epoch.
    pub fn parse(
        path: &Path,
        text: &str,
        tz: TimeZone,
        key: PseudonymKey,
    ) -> Result<Self, Vec<Diagnostic>> {
        let parsed = raw::parse(path, text)?;
        Ok(Self {
            meta: parsed.meta,
            rules: parsed.rules,
            file: path.to_path_buf(),
            tz,
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn retention(&self) -> Duration {
        self.meta.retention
    }

    pub fn meta(&self) -> &PurposeMeta {
        &self.meta
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    /// The pseudonym key epoch every record carries (the key's).
    pub fn epoch(&self) -> u32 {
        self.key.epoch()
    }

    /// The text the policy hash covers: purpose, every rule in file order (selector,
    /// action with form and resolution, override) and time zone. Comments, layout and
    /// descriptions of rules do not change it, and neither does key material: the pseudonym
    /// key and its epoch shape pseudonyms, not what leaves, and every record carries its
    /// epoch — so `check` prints the hash the hub approves without reading a key, and a key
    /// rotation needs no new approval.
    pub fn canonical(&self) -> String {
        use std::fmt::Write;
        let m = &self.meta;
        let mut s = format!(
            "citygate/v1/policy\npurpose={}\ndescription={:?}\nlegal_basis={:?}\nowner={:?}\nretention_s={}\n",
            m.name,
            m.description,
            m.legal_basis,
            m.owner,
            m.retention.as_secs()
        );
        for r in &self.rules {
            let _ = writeln!(
                s,
                "rule {} {} override={:?}",
                r.selector, r.action, r.override_reason
            );
        }
        let tz = self.tz.iana_name().map_or_else(
            || format!("{:?}", self.tz.to_fixed_offset()),
            str::to_string,
        );
        let _ = writeln!(s, "tz={tz}");
        s
    }

    /// The same policy under another pseudonym key (the supervisor swaps the stand-in key
    /// the config was checked with for the gateway's own).
    pub fn with_key(&self, key: PseudonymKey) -> Self {
        Self {
            key,
            ..self.clone()
        }
    }

    /// SHA-256 naming this policy: [`canonical`](Self::canonical) plus `versions` (profile
    /// name@version, …; order does not matter), so the hash changes whenever anything
    /// that shapes the output does.
    pub fn hash(&self, versions: &[String]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.canonical().as_bytes());
        let mut versions = versions.to_vec();
        versions.sort();
        for v in &versions {
            h.update(b"\0version:");
            h.update(v.as_bytes());
        }
        h.finalize().into()
    }

    /// What happens to `field` of classification `class`: one decision per applying rule,
    /// or one `Drop` (default deny). See the module docs for the resolution order.
    pub fn decide(&self, field: &FieldName, class: &Classification) -> Vec<Decision> {
        let named: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| matches!(&r.selector, Selector::Field(f) if f == field))
            .collect();
        let (applying, why) = if named.is_empty() {
            match self.rules.iter().find(|r| r.selector.matches_class(class)) {
                Some(r) => (vec![r], Why::ClassRule),
                None => {
                    return vec![Decision {
                        action: Action::Drop,
                        rule: None,
                        line: None,
                        why: Why::DefaultDeny,
                    }]
                }
            }
        } else {
            (named, Why::FieldRule)
        };
        applying
            .into_iter()
            .map(|r| {
                let refused = guard(r, class);
                Decision {
                    action: if refused.is_some() {
                        Action::Drop
                    } else {
                        r.action.clone()
                    },
                    rule: Some(r.index),
                    line: Some(r.loc.line),
                    why: refused.unwrap_or(why),
                }
            })
            .collect()
    }

    /// The indices of the rules that emit something for `field` (drops left out).
    pub(crate) fn emitting_rules(&self, field: &FieldName, class: &Classification) -> Vec<usize> {
        self.decide(field, class)
            .into_iter()
            .filter(|d| d.action != Action::Drop)
            .filter_map(|d| d.rule)
            .collect()
    }

    /// The device's keyed pseudonym (`p-` + 32 hex digits), as `transform::minimise`.
    /// The device's pseudonym under this purpose: keyed, and separated per purpose, so the
    /// records of two purposes cannot be joined on their subjects without the key.
    pub fn subject(&self, device: &DeviceId) -> String {
        pseudonym::mac(
            &self.key,
            pseudonym::DEVICE_CONTEXT,
            &[self.meta.name.as_bytes(), device.as_str().as_bytes()],
        )
    }

    pub(crate) fn value_pseudonym(&self, field: &FieldName, value: &Value) -> String {
        let text = value.to_string();
        pseudonym::mac(
            &self.key,
            pseudonym::VALUE_CONTEXT,
            &[field.as_str().as_bytes(), text.as_bytes()],
        )
    }

    pub(crate) fn rule(&self, index: usize) -> &Rule {
        &self.rules[index]
    }

    /// Shares the policy between engines.
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}

/// The guard a rule breaks for a field of `class`, if any.
fn guard(rule: &Rule, class: &Classification) -> Option<Why> {
    if class.is_identifying() && !matches!(rule.action, Action::Pseudonymise | Action::Drop) {
        return Some(Why::Identifying);
    }
    let l4_personal = class.personal && class.grade == crate::reading::Grade::L4;
    if l4_personal && rule.action.reveals_per_device() && rule.override_reason.is_none() {
        return Some(Why::L4NeedsOverride);
    }
    None
}

#[cfg(test)]
mod tests;

//! The stateful side of a policy: one [`Engine`] per flow owns the open windows.
//!
//! Hot path (`accept`): one lookup of the field's applying rules (cached per field and
//! classification), one of the device's state, then per rule either an immediate record
//! or a fold into the open window (bounds cached in the window, so the time zone is
//! consulted once per window, not per reading). Nothing is allocated per reading beyond
//! the records pushed; state grows once per device, field and window.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

mod close;
mod snapshot;

pub use snapshot::EngineState;

use super::fold::{increment, Acc, GroupAcc};
use super::form;
use super::rule::{Action, Aggregate, Rule};
use super::{window, CompiledPolicy};
use crate::profile::{Counter, Field, Ratios};
use crate::reading::{
    AggFn, AreaId, Classification, DeviceId, FieldName, Quality, Reading, Record, Unit, Value,
};

/// Grace after a window's end for readings still in flight (a poll round in progress, an
/// MQTT publish on its way) before [`Engine::close_due`] closes the window: 30 s.
pub const LATENESS_MS: i64 = 30_000;

/// Who a reading is from, as the flow knows the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceCtx<'a> {
    pub device: &'a DeviceId,
    /// The device's pseudonym under this policy ([`CompiledPolicy::subject`], cached).
    pub subject: &'a str,
    /// The device's area (feeder, district, building) for area aggregates.
    pub area: Option<&'a AreaId>,
    /// The device's transformer ratios: a counter's rollover (profile units) is scaled
    /// by them into the reading's canonical units.
    pub ratios: Ratios,
}

/// What an engine counted instead of emitting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Records pushed (immediate and windows).
    pub records: u64,
    /// Of those, aggregate records (per device and per area).
    pub aggregates: u64,
    /// Samples for a window that had closed (or older than a counter's last): not folded.
    pub late_samples: u64,
    /// Area aggregates not emitted because fewer than k devices contributed.
    pub suppressed: u64,
    /// Samples of an area aggregate from devices without an area.
    pub no_area_samples: u64,
    /// Bad-quality samples kept out of aggregates.
    pub bad_excluded: u64,
    /// Values a rule cannot compute on (text or bool under a numeric action).
    pub type_mismatch: u64,
}

/// One device's window state for one field and aggregate rule.
#[derive(Debug)]
struct Slot {
    rule: usize,
    unit: Unit,
    /// Canonical-unit rollover of a counter.
    rollover: Option<f64>,
    open: Option<Acc>,
    /// End of the last window closed: earlier samples are late.
    closed_until: i64,
    /// A counter's last sample (value, time).
    prev: Option<(f64, i64)>,
}

#[derive(Debug)]
struct DeviceState {
    subject: String,
    area: Option<Arc<str>>,
    fields: HashMap<FieldName, Vec<Slot>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct GroupKey {
    start_ms: i64,
    rule: usize,
    area: Arc<str>,
    field: FieldName,
}

/// The applying emitting rules of a field of one classification.
type Plan = Arc<[usize]>;

/// Turns readings into records under one policy; owns the flow's open windows.
#[derive(Debug)]
pub struct Engine {
    policy: Arc<CompiledPolicy>,
    plans: HashMap<FieldName, Vec<(Classification, Plan)>>,
    devices: HashMap<DeviceId, DeviceState>,
    groups: BTreeMap<GroupKey, (GroupAcc, Unit)>,
    /// Open windows (device and area) by end: when `close_due` has work.
    ends: BTreeMap<i64, u32>,
    /// The last `close_due` cutoff: windows ending at or before it are closed.
    watermark: i64,
    /// Per rule: the last `time_step` window, so timestamps floor without a tz lookup.
    step_cache: Vec<(i64, i64)>,
    lateness_ms: i64,
    stats: EngineStats,
}

impl Engine {
    pub fn new(policy: Arc<CompiledPolicy>) -> Self {
        let rules = policy.rules().len();
        Self {
            policy,
            plans: HashMap::new(),
            devices: HashMap::new(),
            groups: BTreeMap::new(),
            ends: BTreeMap::new(),
            watermark: i64::MIN,
            step_cache: vec![(0, 0); rules],
            lateness_ms: LATENESS_MS,
            stats: EngineStats::default(),
        }
    }

    /// Replaces the default [`LATENESS_MS`].
    pub fn with_lateness(mut self, lateness_ms: i64) -> Self {
        self.lateness_ms = lateness_ms.max(0);
        self
    }

    pub fn policy(&self) -> &Arc<CompiledPolicy> {
        &self.policy
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    fn plan(&mut self, field: &FieldName, class: &Classification) -> Plan {
        if let Some(p) = self
            .plans
            .get(field)
            .and_then(|v| v.iter().find(|(c, _)| c == class))
        {
            return p.1.clone();
        }
        let plan: Plan = self.policy.emitting_rules(field, class).into();
        self.plans
            .entry(field.clone())
            .or_default()
            .push((*class, plan.clone()));
        plan
    }

    /// Immediate outputs (pass, pseudonymise, generalise) are pushed to `out`; aggregate
    /// rules fold the reading into their windows (and push windows the reading's time
    /// has closed for this device).
    pub fn accept(
        &mut self,
        reading: &Reading,
        field: &Field,
        device: &DeviceCtx<'_>,
        out: &mut Vec<Record>,
    ) {
        let plan = self.plan(&reading.field, &reading.class);
        let policy = Arc::clone(&self.policy);
        for &index in plan.iter() {
            let rule = policy.rule(index);
            match &rule.action {
                Action::Aggregate(agg) => self.fold(rule, agg, reading, field, device, out),
                action => {
                    if let Some(r) = self.immediate(rule, action, reading, device) {
                        self.stats.records += 1;
                        out.push(r);
                    }
                }
            }
        }
    }

    fn immediate(
        &mut self,
        rule: &Rule,
        action: &Action,
        reading: &Reading,
        device: &DeviceCtx<'_>,
    ) -> Option<Record> {
        let mut at_ms = reading.at_ms;
        let value = match action {
            Action::Pass => reading.value.clone(),
            Action::Pseudonymise => {
                Value::Text(self.policy.value_pseudonym(&reading.field, &reading.value))
            }
            Action::Generalise(g) => {
                let value = match &g.value {
                    None => reading.value.clone(),
                    Some(how) => match form::generalise(&reading.value, how) {
                        Some(v) => v,
                        None => {
                            self.stats.type_mismatch += 1;
                            return None;
                        }
                    },
                };
                if let Some(step) = g.time_step {
                    let cached = &mut self.step_cache[rule.index];
                    if !(cached.0..cached.1).contains(&at_ms) {
                        *cached = window::bounds(self.policy.time_zone(), step, at_ms);
                    }
                    at_ms = cached.0;
                }
                value
            }
            Action::Drop | Action::Aggregate(_) => return None,
        };
        Some(Record {
            subject: device.subject.to_string(),
            field: reading.field.as_str().to_string(),
            value,
            unit: reading.unit,
            at_ms,
            quality: reading.quality,
            tags: Vec::new(),
            window: None,
            epoch: self.policy.epoch(),
        })
    }

    fn fold(
        &mut self,
        rule: &Rule,
        agg: &Aggregate,
        reading: &Reading,
        field: &Field,
        device: &DeviceCtx<'_>,
        out: &mut Vec<Record>,
    ) {
        let (x, is_int) = match reading.value {
            Value::Int(i) => (i as f64, true),
            Value::Float(f) => (f, false),
            Value::Bool(_) | Value::Text(_) => {
                self.stats.type_mismatch += 1;
                return;
            }
        };
        if matches!(reading.quality, Quality::Bad(_)) || !x.is_finite() {
            self.stats.bad_excluded += 1;
            return;
        }
        if agg.group.is_some() && device.area.is_none() {
            self.stats.no_area_samples += 1;
            return;
        }
        let at = reading.at_ms;
        let in_hours = agg
            .hours
            .map_or(true, |h| h.contains(self.policy.time_zone(), at));
        let state = device_state(&mut self.devices, device);
        let slots = match state.fields.get_mut(&reading.field) {
            Some(s) => s,
            None => state.fields.entry(reading.field.clone()).or_default(),
        };
        let slot = match slots.iter().position(|s| s.rule == rule.index) {
            Some(i) => &mut slots[i],
            None => {
                let rollover = match field.counter {
                    Counter::Monotonic { rollover } => rollover
                        .map(|r| r * field.unit.factor * device.ratios.multiplier(field.ratio)),
                    Counter::None => None,
                };
                slots.push(Slot {
                    rule: rule.index,
                    unit: reading.unit,
                    rollover,
                    open: None,
                    closed_until: i64::MIN,
                    prev: None,
                });
                slots.last_mut().expect("invariant: just pushed")
            }
        };
        // A counter's increment is decided by sample order, whatever the window.
        let mut sample = (x, false);
        if agg.function == AggFn::Delta {
            match slot.prev {
                Some((_, prev_at)) if at <= prev_at => {
                    self.stats.late_samples += 1;
                    return;
                }
                Some((prev, _)) => sample = increment(prev, x, slot.rollover),
                None => sample = (0.0, false),
            }
        }
        if !in_hours {
            if agg.function == AggFn::Delta && at >= slot.closed_until {
                slot.prev = Some((x, at));
            }
            return;
        }
        let tz = self.policy.time_zone();
        let open_ok = slot
            .open
            .as_ref()
            .map(|a| (a.start_ms..a.end_ms).contains(&at));
        let mut closed = None;
        match open_ok {
            Some(true) => {}
            Some(false) if at < slot.open.as_ref().map_or(i64::MIN, |a| a.start_ms) => {
                self.stats.late_samples += 1;
                return;
            }
            _ => {
                let (start, end) = window::bounds(tz, agg.window, at);
                if at < slot.closed_until || end <= self.watermark {
                    self.stats.late_samples += 1;
                    return;
                }
                closed = slot.open.take();
                // The device's first window here: what came before `at` was never seen.
                let first = closed.is_none() && slot.closed_until == i64::MIN;
                if let Some(c) = &closed {
                    slot.closed_until = c.end_ms;
                }
                let mut acc = Acc::new(start, end);
                acc.partial = first && at > start;
                slot.open = Some(acc);
                *self.ends.entry(end).or_insert(0) += 1;
            }
        }
        if agg.function == AggFn::Delta {
            slot.prev = Some((x, at));
        }
        let acc = slot.open.as_mut().expect("invariant: opened above");
        acc.fold(sample.0, is_int, at, reading.quality);
        if sample.1 {
            acc.mark_reset();
        }
        let unit = slot.unit;
        if let Some(acc) = closed {
            let subject = state.subject.clone();
            let area = state.area.clone();
            let key = (reading.field.clone(), subject, area);
            self.close_slot(rule, agg, &key, unit, acc, false, out);
        }
    }
}

/// The state of `device`, created on first sight; its area and subject follow the ctx.
fn device_state<'s>(
    devices: &'s mut HashMap<DeviceId, DeviceState>,
    device: &DeviceCtx<'_>,
) -> &'s mut DeviceState {
    if !devices.contains_key(device.device) {
        devices.insert(
            device.device.clone(),
            DeviceState {
                subject: device.subject.to_string(),
                area: None,
                fields: HashMap::new(),
            },
        );
    }
    let state = devices
        .get_mut(device.device)
        .expect("invariant: inserted above");
    let area = device.area.map(AreaId::as_str);
    if state.area.as_deref() != area {
        state.area = area.map(Arc::from);
    }
    if state.subject != device.subject {
        state.subject = device.subject.to_string();
    }
    state
}

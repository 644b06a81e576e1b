//! [`EngineState`]: an engine's open windows and counter history as plain data, so a flow
//! can be checkpointed with the batches it sealed and resumed after a crash
//! (`pipeline::checkpoint`).
//!
//! What is kept: per device its pseudonym, area and, per field and aggregate rule, the open
//! window, the end of the last window closed and a counter's last sample; the open area
//! windows; the close watermark. What is not: caches (rule plans, time steps), counters
//! (metrics are per process). A state only applies to the policy it was taken under: its
//! canonical hash is inside and [`Engine::restore`] refuses another.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{DeviceState, Engine, GroupKey, Slot};
use crate::policy::fold::{Acc, GroupAcc};
use crate::reading::{DeviceId, FieldName, Unit};

/// An engine's state; see the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    /// [`crate::policy::CompiledPolicy::hash`] without profile versions.
    policy: [u8; 32],
    watermark: i64,
    devices: Vec<DeviceSnap>,
    groups: Vec<GroupSnap>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DeviceSnap {
    device: String,
    subject: String,
    area: Option<String>,
    fields: Vec<(String, Vec<SlotSnap>)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SlotSnap {
    rule: usize,
    unit: Unit,
    rollover: Option<f64>,
    open: Option<Acc>,
    closed_until: i64,
    prev: Option<(f64, i64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GroupSnap {
    start_ms: i64,
    rule: usize,
    area: String,
    field: String,
    acc: GroupAcc,
    unit: Unit,
}

impl EngineState {
    /// Whether nothing is open and no counter history is kept.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.groups.is_empty()
    }

    /// Open windows (device and area).
    pub fn open_windows(&self) -> usize {
        let device: usize = self
            .devices
            .iter()
            .flat_map(|d| &d.fields)
            .flat_map(|(_, slots)| slots)
            .filter(|s| s.open.is_some())
            .count();
        device + self.groups.len()
    }
}

/// Why a state was not restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("the state was taken under another policy")]
    OtherPolicy,
    #[error("the state names an invalid {0}")]
    Invalid(&'static str),
}

impl Engine {
    /// The engine's windows and counter history (see [`EngineState`]).
    pub fn snapshot(&self) -> EngineState {
        let mut devices: Vec<DeviceSnap> = self
            .devices
            .iter()
            .filter(|(_, d)| !d.fields.is_empty())
            .map(|(id, d)| DeviceSnap {
                device: id.as_str().to_owned(),
                subject: d.subject.clone(),
                area: d.area.as_deref().map(str::to_owned),
                fields: d
                    .fields
                    .iter()
                    .map(|(f, slots)| {
                        let slots = slots
                            .iter()
                            .map(|s| SlotSnap {
                                rule: s.rule,
                                unit: s.unit,
                                rollover: s.rollover,
                                open: s.open.clone(),
                                closed_until: s.closed_until,
                                prev: s.prev,
                            })
                            .collect();
                        (f.as_str().to_owned(), slots)
                    })
                    .collect(),
            })
            .collect();
        devices.sort_by(|a, b| a.device.cmp(&b.device));
        for d in &mut devices {
            d.fields.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let groups = self
            .groups
            .iter()
            .map(|(k, (acc, unit))| GroupSnap {
                start_ms: k.start_ms,
                rule: k.rule,
                area: k.area.to_string(),
                field: k.field.as_str().to_owned(),
                acc: acc.clone(),
                unit: *unit,
            })
            .collect();
        EngineState {
            policy: self.policy.hash(&[]),
            watermark: self.watermark,
            devices,
            groups,
        }
    }

    /// Replaces the engine's windows and counter history by `state`, taken under the same
    /// policy; on an error nothing is changed.
    pub fn restore(&mut self, state: &EngineState) -> Result<(), RestoreError> {
        if state.policy != self.policy.hash(&[]) {
            return Err(RestoreError::OtherPolicy);
        }
        let rules = self.policy.rules().len();
        let mut devices = HashMap::new();
        let mut ends = std::collections::BTreeMap::new();
        for d in &state.devices {
            let id = DeviceId::new(&d.device).map_err(|_| RestoreError::Invalid("device"))?;
            let mut fields = HashMap::new();
            for (f, slots) in &d.fields {
                let field = FieldName::new(f).map_err(|_| RestoreError::Invalid("field"))?;
                let mut restored = Vec::with_capacity(slots.len());
                for s in slots {
                    if s.rule >= rules {
                        return Err(RestoreError::Invalid("rule"));
                    }
                    if let Some(acc) = &s.open {
                        *ends.entry(acc.end_ms).or_insert(0u32) += 1;
                    }
                    restored.push(Slot {
                        rule: s.rule,
                        unit: s.unit,
                        rollover: s.rollover,
                        open: s.open.clone(),
                        closed_until: s.closed_until,
                        prev: s.prev,
                    });
                }
                fields.insert(field, restored);
            }
            let state = DeviceState {
                subject: d.subject.clone(),
                area: d.area.as_deref().map(Arc::from),
                fields,
            };
            devices.insert(id, state);
        }
        let mut groups = std::collections::BTreeMap::new();
        for g in &state.groups {
            if g.rule >= rules {
                return Err(RestoreError::Invalid("rule"));
            }
            let field = FieldName::new(&g.field).map_err(|_| RestoreError::Invalid("field"))?;
            let key = GroupKey {
                start_ms: g.start_ms,
                rule: g.rule,
                area: Arc::from(g.area.as_str()),
                field,
            };
            *ends.entry(g.acc.end_ms).or_insert(0u32) += 1;
            groups.insert(key, (g.acc.clone(), g.unit));
        }
        self.devices = devices;
        self.groups = groups;
        self.ends = ends;
        self.watermark = state.watermark;
        Ok(())
    }
}

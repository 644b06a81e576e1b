//! When an alarm-stream reading is sent: on change, and as a periodic standing state.
//!
//! Alarm and tamper bits are read on every poll, but an operator needs two things from
//! them: to hear at once when one changes, and to know, from time to time, that a
//! quiet alarm is still quiet (a silent stream could also mean a dead link). So an
//! alarm-stream reading passes the gate when it is the first of its (device, field), when
//! its value or quality differs from the last one sent, or when the last one sent is
//! at least `state_every` old (by the readings' own timestamps, so replays and tests
//! are deterministic). Everything else is dropped at the edge and counted by the caller.
//! Measurement fields never go through the gate.

use std::collections::HashMap;
use std::time::Duration;

use crate::reading::{DeviceId, FieldName, Quality, Reading, TimestampMs, Value};

#[derive(Debug, Clone, PartialEq)]
struct Sent {
    value: Value,
    quality: Quality,
    at_ms: TimestampMs,
}

/// Remembers the last alarm reading sent per (device, field).
#[derive(Debug)]
pub(crate) struct AlarmGate {
    state_every_ms: i64,
    last: HashMap<(DeviceId, FieldName), Sent>,
}

impl AlarmGate {
    pub(crate) fn new(state_every: Duration) -> Self {
        Self {
            state_every_ms: i64::try_from(state_every.as_millis()).unwrap_or(i64::MAX),
            last: HashMap::new(),
        }
    }

    /// Whether `reading` goes out: first seen, changed, or due as standing state.
    /// Remembers it when it does.
    pub(crate) fn pass(&mut self, reading: &Reading) -> bool {
        let key = (reading.device.clone(), reading.field.clone());
        let due = match self.last.get(&key) {
            None => true,
            Some(s) => {
                s.value != reading.value
                    || s.quality != reading.quality
                    || reading.at_ms.saturating_sub(s.at_ms) >= self.state_every_ms
                    || reading.at_ms < s.at_ms
            }
        };
        if due {
            self.last.insert(
                key,
                Sent {
                    value: reading.value.clone(),
                    quality: reading.quality,
                    at_ms: reading.at_ms,
                },
            );
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Category, Classification, Grade, QualityReason, Unit};

    fn bit(device: &str, field: &str, on: bool, at_ms: i64) -> Reading {
        Reading {
            device: DeviceId::new(device).unwrap(),
            field: FieldName::new(field).unwrap(),
            value: Value::Bool(on),
            unit: Unit::One,
            at_ms,
            quality: Quality::Good,
            class: Classification {
                category: Category::Alarm,
                grade: Grade::L2,
                personal: false,
            },
        }
    }

    #[test]
    fn first_change_and_standing_state_pass_repeats_do_not() {
        let mut g = AlarmGate::new(Duration::from_secs(60));
        let seq = [
            (false, 0, true),      // first reading: the standing state
            (false, 1_000, false), // unchanged
            (true, 2_000, true),   // raised
            (true, 3_000, false),  // still raised
            (true, 61_999, false), // 59.999 s after the last sent
            (true, 62_000, true),  // standing state again after 60 s
            (false, 62_500, true), // cleared
            (false, 63_000, false),
        ];
        for (on, at, expected) in seq {
            assert_eq!(
                g.pass(&bit("m1", "tamper", on, at)),
                expected,
                "{on} at {at}"
            );
        }
    }

    #[test]
    fn devices_fields_and_quality_are_tracked_separately() {
        let mut g = AlarmGate::new(Duration::from_secs(60));
        assert!(g.pass(&bit("m1", "tamper", false, 0)));
        assert!(g.pass(&bit("m2", "tamper", false, 0)));
        assert!(g.pass(&bit("m1", "valve_fault", false, 0)));
        assert!(!g.pass(&bit("m1", "tamper", false, 10)));
        let mut bad = bit("m1", "tamper", false, 20);
        bad.quality = Quality::Bad(QualityReason::NotAvailable);
        assert!(g.pass(&bad), "a quality change is a change");
    }
}

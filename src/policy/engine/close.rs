//! Closing windows: a device's window emits its record, or adds to its area's window;
//! area windows emit when due if at least k devices contributed.

use std::sync::Arc;

use super::{Engine, GroupKey};
use crate::policy::fold::{Acc, GroupAcc};
use crate::policy::rule::{Action, Aggregate, Rule};
use crate::reading::{FieldName, Record, Unit, Window};

/// A device window's identity when it closes: field, subject, area.
pub(super) type SlotKey = (FieldName, String, Option<Arc<str>>);

impl Engine {
    /// Emits a closed device window, or adds it to its area's window.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn close_slot(
        &mut self,
        rule: &Rule,
        agg: &Aggregate,
        (field, subject, area): &SlotKey,
        unit: Unit,
        acc: Acc,
        partial: bool,
        out: &mut Vec<Record>,
    ) {
        self.forget_end(acc.end_ms);
        let covers_part = partial || acc.partial;
        let Some(group) = agg.group else {
            self.stats.records += 1;
            self.stats.aggregates += 1;
            out.push(Record {
                subject: subject.clone(),
                field: field.as_str().to_string(),
                value: acc.value(agg.function),
                unit,
                at_ms: acc.start_ms,
                quality: acc.quality,
                tags: Vec::new(),
                window: Some(Window {
                    function: agg.function,
                    start_ms: acc.start_ms,
                    end_ms: acc.end_ms,
                    samples: acc.samples,
                    devices: 1,
                    partial: covers_part,
                }),
                epoch: self.policy.epoch(),
            });
            return;
        };
        let Some(area) = area else {
            self.stats.no_area_samples += u64::from(acc.samples);
            return;
        };
        if acc.end_ms <= self.watermark && !partial {
            self.stats.late_samples += u64::from(acc.samples);
            return;
        }
        let key = GroupKey {
            start_ms: acc.start_ms,
            rule: rule.index,
            area: area.clone(),
            field: field.clone(),
        };
        let end = acc.end_ms;
        let ends = &mut self.ends;
        let (g, _) = self.groups.entry(key).or_insert_with(|| {
            *ends.entry(end).or_insert(0) += 1;
            (GroupAcc::new(acc.start_ms, end, group.across), unit)
        });
        g.add(&acc, agg.function, covers_part);
    }

    fn forget_end(&mut self, end: i64) {
        if let Some(n) = self.ends.get_mut(&end) {
            *n -= 1;
            if *n == 0 {
                self.ends.remove(&end);
            }
        }
    }

    /// When the next window is due to close (its end plus the lateness), if any is open.
    pub fn next_close_ms(&self) -> Option<i64> {
        self.ends
            .first_key_value()
            .map(|(end, _)| end.saturating_add(self.lateness_ms))
    }

    /// Pushes every window that ended at or before `now_ms - lateness`.
    pub fn close_due(&mut self, now_ms: i64, out: &mut Vec<Record>) {
        let cutoff = now_ms.saturating_sub(self.lateness_ms);
        self.close_where(|end| end <= cutoff, false, out);
        self.watermark = self.watermark.max(cutoff);
    }

    /// Shutdown: pushes every open window, marked partial.
    pub fn flush_partial(&mut self, out: &mut Vec<Record>) {
        self.close_where(|_| true, true, out);
    }

    fn close_where(&mut self, due: impl Fn(i64) -> bool, partial: bool, out: &mut Vec<Record>) {
        if !self
            .ends
            .first_key_value()
            .is_some_and(|(end, _)| due(*end))
        {
            return;
        }
        let policy = Arc::clone(&self.policy);
        let mut closing = Vec::new();
        for state in self.devices.values_mut() {
            for (field, slots) in &mut state.fields {
                for slot in slots.iter_mut() {
                    if slot.open.as_ref().is_some_and(|a| due(a.end_ms)) {
                        let acc = slot.open.take().expect("invariant: checked open");
                        slot.closed_until = acc.end_ms;
                        let key = (field.clone(), state.subject.clone(), state.area.clone());
                        closing.push((slot.rule, key, slot.unit, acc));
                    }
                }
            }
        }
        closing.sort_by(|a, b| {
            (a.3.start_ms, &a.1 .1, &a.1 .0).cmp(&(b.3.start_ms, &b.1 .1, &b.1 .0))
        });
        for (index, key, unit, acc) in closing {
            let rule = policy.rule(index);
            if let Action::Aggregate(agg) = &rule.action {
                self.close_slot(rule, agg, &key, unit, acc, partial, out);
            }
        }
        let due_groups: Vec<GroupKey> = self
            .groups
            .iter()
            .filter(|(_, (g, _))| due(g.end_ms))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due_groups {
            let Some((g, unit)) = self.groups.remove(&key) else {
                continue;
            };
            self.forget_end(g.end_ms);
            let rule = policy.rule(key.rule);
            let Action::Aggregate(Aggregate {
                function,
                group: Some(group),
                ..
            }) = &rule.action
            else {
                continue;
            };
            if g.devices() < group.k {
                self.stats.suppressed += 1;
                continue;
            }
            self.stats.records += 1;
            self.stats.aggregates += 1;
            out.push(Record {
                subject: format!("area:{}", key.area),
                field: key.field.as_str().to_string(),
                value: g.value(),
                unit,
                at_ms: key.start_ms,
                quality: g.quality(),
                tags: vec![format!("across={}", group.across.as_str())],
                window: Some(Window {
                    function: *function,
                    start_ms: key.start_ms,
                    end_ms: g.end_ms,
                    samples: g.samples,
                    devices: g.devices(),
                    partial: g.partial || partial,
                }),
                epoch: self.policy.epoch(),
            });
        }
    }
}

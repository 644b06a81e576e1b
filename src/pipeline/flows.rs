//! The purpose flows a reading runs through: one [`Engine`] per flow, each with its own
//! stream, policy stamp and device pseudonyms.
//!
//! A readings-stream field goes through every purpose flow (`[policies] flows`), each of which
//! may let it leave in its own form (or not at all); an alarms-stream field goes through the
//! alarms policy only (`[policies] alarms`; without one, alarm fields stay on the box).
//! Aggregate windows close on the wall clock ([`Flows::close_due`]), and whatever is open
//! at shutdown leaves marked partial ([`Flows::flush_partial`]).
//!
//! While an emergency collection runs, its flow ([`Flows::start_emergency`]) takes the
//! readings-stream fields too, on [`Stream::EMERGENCY`], and tags every record it lets out
//! `emergency` and `emergency_id=<id>`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{FlowConfig, GatewayConfig};
use crate::policy::{CompiledPolicy, DeviceCtx, Engine, EngineStats};
use crate::profile::{Field, Ratios};
use crate::reading::{AreaId, DeviceId, PurposeName, Reading, Record, Stream};
use crate::seal::{PolicyStamp, PseudonymKey};
use crate::telemetry::Metrics;

/// One purpose flow.
#[derive(Debug)]
pub struct Flow {
    stream: Stream,
    engine: Engine,
    stamp: PolicyStamp,
    /// Device pseudonyms under this flow's purpose, computed once per device.
    subjects: HashMap<DeviceId, String>,
    /// Added to every record the flow lets out (an emergency's tags).
    tags: Vec<String>,
}

impl Flow {
    /// A flow on `stream` under `policy`; `versions` (profile name@version) go into its hash.
    pub fn new(stream: Stream, policy: Arc<CompiledPolicy>, versions: &[String]) -> Flow {
        let purpose = PurposeName::new(policy.name())
            .expect("invariant: a compiled policy has a valid purpose name");
        let stamp = PolicyStamp::new(purpose, policy.hash(versions));
        Flow {
            stream,
            engine: Engine::new(policy),
            stamp,
            subjects: HashMap::new(),
            tags: Vec::new(),
        }
    }

    /// Adds `tags` to every record this flow lets out.
    pub fn with_tags(mut self, tags: Vec<String>) -> Flow {
        self.tags = tags;
        self
    }

    /// Moves what the engine left in `scratch` to `out`, on this flow's stream and tagged.
    fn drain(&self, scratch: &mut Vec<Record>, out: &mut Vec<(Stream, Record)>) {
        out.extend(scratch.drain(..).map(|mut r| {
            r.tags.extend(self.tags.iter().cloned());
            (self.stream, r)
        }));
    }

    /// Overrides the grace after a window's end before it closes (tests).
    pub fn with_lateness(mut self, lateness_ms: i64) -> Flow {
        self.engine = self.engine.with_lateness(lateness_ms);
        self
    }

    pub fn stamp(&self) -> &PolicyStamp {
        &self.stamp
    }

    fn accept(
        &mut self,
        reading: &Reading,
        field: &Field,
        area: Option<&AreaId>,
        ratios: Ratios,
        scratch: &mut Vec<Record>,
        out: &mut Vec<(Stream, Record)>,
    ) {
        let policy = self.engine.policy();
        let subject = self
            .subjects
            .entry(reading.device.clone())
            .or_insert_with(|| policy.subject(&reading.device));
        let cx = DeviceCtx {
            device: &reading.device,
            subject,
            area,
            ratios,
        };
        self.engine.accept(reading, field, &cx, scratch);
        self.drain(scratch, out);
    }
}

/// Every flow of a gateway, and the devices' areas.
#[derive(Debug, Default)]
pub struct Flows {
    readings: Vec<Flow>,
    alarms: Option<Flow>,
    /// The emergency collection's flow while one runs.
    emergency: Option<Flow>,
    areas: HashMap<DeviceId, AreaId>,
    scratch: Vec<Record>,
    /// Engine counters already added to the metrics.
    reported: EngineStats,
}

impl Flows {
    pub fn new(readings: Vec<Flow>, alarms: Option<Flow>) -> Flows {
        Flows {
            readings,
            alarms,
            ..Flows::default()
        }
    }

    /// The flows `cfg` declares, with the gateway's pseudonym key.
    pub fn from_config(cfg: &GatewayConfig, key: &PseudonymKey) -> Flows {
        let versions = cfg.profile_versions();
        let flow = |f: &FlowConfig| {
            Flow::new(
                f.stream,
                Arc::new(f.policy.with_key(key.clone())),
                &versions,
            )
        };
        let areas = cfg
            .devices
            .iter()
            .filter_map(|d| Some((d.id.clone(), d.area.clone()?)))
            .collect();
        Flows {
            readings: cfg.policies.flows.iter().map(flow).collect(),
            alarms: cfg.policies.alarms.as_ref().map(flow),
            areas,
            ..Flows::default()
        }
    }

    /// Sets the devices' areas.
    pub fn with_areas(mut self, areas: HashMap<DeviceId, AreaId>) -> Flows {
        self.areas = areas;
        self
    }

    /// The stamp each stream's batches are sealed under (by [`Stream::index`]): its flow's;
    /// the built-in gateway stamp on the audit stream and on streams no flow uses (the
    /// alarms stream without an alarms policy carries only the gateway's own alarms).
    pub(crate) fn stamps(&self) -> Vec<PolicyStamp> {
        let mut stamps = vec![PolicyStamp::gateway(); Stream::COUNT];
        for f in self.readings.iter().chain(&self.alarms) {
            stamps[f.stream.index()] = f.stamp.clone();
        }
        stamps
    }

    /// Whether an alarms-stream `reading` would leave at all (the alarm gate holds back
    /// repeats only of alarms that leave).
    pub(crate) fn alarm_leaves(&self, reading: &Reading) -> bool {
        self.alarms.as_ref().is_some_and(|f| {
            f.engine
                .policy()
                .decide(&reading.field, &reading.class)
                .iter()
                .any(|d| d.rule.is_some() && d.action != crate::policy::Action::Drop)
        })
    }

    /// Runs a checked reading through the flows of its stream; pushes what leaves to `out`.
    pub(crate) fn apply(
        &mut self,
        reading: &Reading,
        field: &Field,
        ratios: Ratios,
        out: &mut Vec<(Stream, Record)>,
    ) {
        let area = self.areas.get(&reading.device);
        if field.stream == Stream::Alarms {
            if let Some(f) = &mut self.alarms {
                f.accept(reading, field, area, ratios, &mut self.scratch, out);
            }
            return;
        }
        for f in self.readings.iter_mut().chain(&mut self.emergency) {
            f.accept(reading, field, area, ratios, &mut self.scratch, out);
        }
    }

    /// Switches an emergency collection's flow on (replacing any other).
    pub(crate) fn start_emergency(&mut self, flow: Flow) {
        self.emergency = Some(flow);
    }

    /// Switches the emergency flow off; its open windows are dropped unsent. Returns how
    /// many aggregate records they would have made.
    pub(crate) fn end_emergency(&mut self) -> u64 {
        let Some(mut f) = self.emergency.take() else {
            return 0;
        };
        f.engine.flush_partial(&mut self.scratch);
        let n = self.scratch.len() as u64;
        self.scratch.clear();
        n
    }

    /// When the next aggregate window is due to close (wall clock, ms), if any is open.
    pub(crate) fn next_close_ms(&self) -> Option<i64> {
        self.all().filter_map(|f| f.engine.next_close_ms()).min()
    }

    /// Closes every window due at `now_ms`; pushes the aggregates to `out`.
    pub(crate) fn close_due(&mut self, now_ms: i64, out: &mut Vec<(Stream, Record)>) {
        let (flows, scratch) = self.all_mut();
        for f in flows {
            f.engine.close_due(now_ms, scratch);
            f.drain(scratch, out);
        }
    }

    /// Shutdown: every open window leaves, marked partial.
    pub(crate) fn flush_partial(&mut self, out: &mut Vec<(Stream, Record)>) {
        let (flows, scratch) = self.all_mut();
        for f in flows {
            f.engine.flush_partial(scratch);
            f.drain(scratch, out);
        }
    }

    /// Adds what the engines counted since the last call to the metrics.
    pub(crate) fn report(&mut self, metrics: &Metrics) {
        let mut now = EngineStats::default();
        for f in self.all() {
            let s = f.engine.stats();
            now.suppressed += s.suppressed;
            now.late_samples += s.late_samples;
            now.aggregates += s.aggregates;
        }
        metrics
            .aggregates_suppressed
            .add(now.suppressed.saturating_sub(self.reported.suppressed));
        metrics
            .samples_late
            .add(now.late_samples.saturating_sub(self.reported.late_samples));
        metrics
            .aggregates_emitted
            .add(now.aggregates.saturating_sub(self.reported.aggregates));
        self.reported = now;
    }

    /// The purpose and alarms flows' states for a checkpoint (the emergency flow's is not
    /// kept: see `checkpoint.rs`).
    pub(crate) fn snapshot(&self) -> Vec<super::checkpoint::FlowState> {
        self.readings
            .iter()
            .chain(&self.alarms)
            .map(|f| super::checkpoint::FlowState {
                stream: f.stream,
                policy_hash: f.stamp.hash,
                state: f.engine.snapshot(),
            })
            .collect()
    }

    /// Resumes each flow from its state in `states` when its stream and policy hash match;
    /// returns (flows resumed, states dropped).
    pub(crate) fn restore(&mut self, states: &[super::checkpoint::FlowState]) -> (usize, usize) {
        let mut resumed = 0;
        for s in states {
            let flow = self
                .readings
                .iter_mut()
                .chain(&mut self.alarms)
                .find(|f| f.stream == s.stream && f.stamp.hash == s.policy_hash);
            if let Some(f) = flow {
                if f.engine.restore(&s.state).is_ok() {
                    resumed += 1;
                }
            }
        }
        (resumed, states.len() - resumed)
    }

    /// Whether a purpose or alarms flow runs on `stream`.
    pub(crate) fn stamps_of(&self, stream: Stream) -> bool {
        self.readings
            .iter()
            .chain(&self.alarms)
            .any(|f| f.stream == stream)
    }

    fn all(&self) -> impl Iterator<Item = &Flow> {
        self.readings
            .iter()
            .chain(&self.alarms)
            .chain(&self.emergency)
    }

    /// Every flow, mutably, and the scratch buffer beside them.
    fn all_mut(&mut self) -> (impl Iterator<Item = &mut Flow>, &mut Vec<Record>) {
        let flows = self
            .readings
            .iter_mut()
            .chain(&mut self.alarms)
            .chain(&mut self.emergency);
        (flows, &mut self.scratch)
    }
}

#[cfg(test)]
#[path = "flows_measure.rs"]
mod measure;

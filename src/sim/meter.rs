//! [`SimMeters`]: a set of simulated meters behind one profile, how they answer a
//! register read, their faults and the history of what they served.
//!
//! Each unit's state sits behind its own mutex, held only for the few microseconds a
//! read takes (never across an await), so the TCP server can serve many connections
//! and tests can inspect state while it runs. A poisoned lock is recovered: the state
//! is plain data and stays consistent between statements.
//!
//! Order of checks for a read: unknown unit or `Silent` → not served (`read` returns
//! `GatewayTargetDevice`, the TCP server sends nothing); `Exception(code)` → `code`;
//! wrong function → `IllegalFunction`; quantity 0 or above 125 → `IllegalDataValue`;
//! outside the served block → `IllegalDataAddress`. Only then may a new snapshot be
//! taken, so failed reads never advance the values.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_modbus::ExceptionCode;

use super::map::RegisterMap;
use super::model::MeterModel;
use crate::profile::{FunctionCode, Profile, MAX_REGISTERS_PER_READ};
use crate::reading::{now_ms, FieldName, RegisterAddress, TimestampMs, UnitId};

/// How long one snapshot is served before values evolve, unless set by
/// [`SimMeters::with_tick`].
pub const DEFAULT_TICK: Duration = Duration::from_millis(100);
/// Snapshots kept per unit; older ones are dropped first.
pub const HISTORY_LIMIT: usize = 10_000;

/// A fault a simulated unit shows to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers normally.
    None,
    /// Answers after this delay.
    Slow(Duration),
    /// Never answers.
    Silent,
    /// Answers every request with this exception (e.g. `ServerDeviceBusy`).
    Exception(ExceptionCode),
}

/// One snapshot of the engineering values a simulated meter served.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Wall-clock time the snapshot was taken (UTC ms).
    pub at_ms: TimestampMs,
    /// Engineering value of every field in the profile's unit, decoded back from the
    /// served registers (after f32 or integer rounding).
    pub values: BTreeMap<FieldName, f64>,
}

#[derive(Debug)]
struct UnitState {
    fault: Fault,
    model: MeterModel,
    /// The registers currently served; empty until the first successful read.
    image: Vec<u16>,
    taken_at: Option<Instant>,
    history: VecDeque<Snapshot>,
    served: u64,
    /// Reads answered with data at the poll marker (see [`SimMeters::count_polls_at`]).
    polls_served: u64,
}

#[derive(Debug)]
struct Inner {
    profile: Arc<Profile>,
    map: RegisterMap,
    /// Snapshot lifetime in nanoseconds (shared by every clone).
    tick_nanos: AtomicU64,
    /// Snapshots kept per unit (shared by every clone).
    history_limit: AtomicUsize,
    /// Start address of the read that counts as one poll; `NO_MARKER` if unset.
    poll_marker: AtomicU32,
    /// False once [`SimMeters::stop_answering`] was called.
    answering: AtomicBool,
    /// Index `i` holds unit id `i + 1`.
    units: Vec<Mutex<UnitState>>,
}

/// [`Inner::poll_marker`] when no read is counted as a poll.
const NO_MARKER: u32 = u32::MAX;

/// Simulated meters with unit ids `1..=count`, all following one profile.
///
/// Cloning is cheap and every clone shares the same meters.
#[derive(Debug, Clone)]
pub struct SimMeters {
    inner: Arc<Inner>,
}

impl SimMeters {
    /// `count` meters with unit ids `1..=count`; values are deterministic per `seed`
    /// and unit id.
    pub fn new(profile: Arc<Profile>, count: u8, seed: u64) -> SimMeters {
        let units = (1..=count)
            .map(|id| {
                Mutex::new(UnitState {
                    fault: Fault::None,
                    model: MeterModel::new(&profile, seed, UnitId(id)),
                    image: Vec::new(),
                    taken_at: None,
                    history: VecDeque::new(),
                    served: 0,
                    polls_served: 0,
                })
            })
            .collect();
        SimMeters {
            inner: Arc::new(Inner {
                map: RegisterMap::new(&profile),
                profile,
                tick_nanos: AtomicU64::new(nanos(DEFAULT_TICK)),
                history_limit: AtomicUsize::new(HISTORY_LIMIT),
                poll_marker: AtomicU32::new(NO_MARKER),
                answering: AtomicBool::new(true),
                units,
            }),
        }
    }

    /// Sets how long one snapshot is served (for every clone).
    pub fn with_tick(self, tick: Duration) -> Self {
        self.inner.tick_nanos.store(nanos(tick), Ordering::Relaxed);
        self
    }

    /// Keeps at most `limit` (at least 1) snapshots per unit (for every clone); a
    /// long-running simulator that nobody inspects keeps one.
    pub fn with_history_limit(self, limit: usize) -> Self {
        self.inner
            .history_limit
            .store(limit.max(1), Ordering::Relaxed);
        self
    }

    /// Counts, per unit, the reads starting at `start` answered with data: with `start`
    /// the first read of the gateway's plan that carries a field, each count is one poll
    /// the unit answered ([`SimMeters::polls_served`]).
    pub fn count_polls_at(&self, start: RegisterAddress) {
        self.inner
            .poll_marker
            .store(u32::from(start.0), Ordering::Relaxed);
    }

    /// Polls `unit` answered (see [`SimMeters::count_polls_at`]).
    pub fn polls_served(&self, unit: UnitId) -> u64 {
        self.state(unit).map_or(0, |s| s.polls_served)
    }

    /// From now on no unit answers (as if silent), so the counts stop changing while the
    /// answers already given are still being written out.
    pub fn stop_answering(&self) {
        self.inner.answering.store(false, Ordering::SeqCst);
    }

    pub fn profile(&self) -> &Arc<Profile> {
        &self.inner.profile
    }

    /// Sets a unit's fault; ignored for unit ids that are not simulated.
    pub fn set_fault(&self, unit: UnitId, fault: Fault) {
        if let Some(mut s) = self.state(unit) {
            tracing::debug!(unit = %unit, fault = ?fault, "sim fault set");
            s.fault = fault;
        }
    }

    /// A unit's fault; unit ids that are not simulated are `Silent`.
    pub(crate) fn fault(&self, unit: UnitId) -> Fault {
        self.state(unit).map_or(Fault::Silent, |s| s.fault)
    }

    /// Serves a register read as the unit would. See the module docs for the order
    /// of checks. Values evolve on reads: a new snapshot is taken when the current
    /// one is older than the tick, so the blocks of one poll see one snapshot.
    /// `Slow` is not applied here (the TCP server sleeps); `Silent` and unknown
    /// units return `GatewayTargetDevice` without being served.
    pub fn read(
        &self,
        unit: UnitId,
        function: FunctionCode,
        start: RegisterAddress,
        count: u16,
    ) -> Result<Vec<u16>, ExceptionCode> {
        self.answer(unit, function, start, count)
            .unwrap_or(Err(ExceptionCode::GatewayTargetDevice))
    }

    /// Like [`SimMeters::read`], but `None` where the unit does not answer.
    pub(super) fn answer(
        &self,
        unit: UnitId,
        function: FunctionCode,
        start: RegisterAddress,
        count: u16,
    ) -> Option<Result<Vec<u16>, ExceptionCode>> {
        if !self.inner.answering.load(Ordering::SeqCst) {
            return None;
        }
        let mut s = self.state(unit)?;
        match s.fault {
            Fault::Silent => return None,
            Fault::Exception(code) => {
                s.served += 1;
                return Some(Err(code));
            }
            Fault::None | Fault::Slow(_) => {}
        }
        s.served += 1;
        if function != self.inner.profile.function {
            return Some(Err(ExceptionCode::IllegalFunction));
        }
        if count == 0 || count > MAX_REGISTERS_PER_READ {
            return Some(Err(ExceptionCode::IllegalDataValue));
        }
        let Some(range) = self.inner.map.slice(start, count) else {
            return Some(Err(ExceptionCode::IllegalDataAddress));
        };
        self.refresh(&mut s);
        if u32::from(start.0) == self.inner.poll_marker.load(Ordering::Relaxed) {
            s.polls_served += 1;
        }
        Some(Ok(s.image[range].to_vec()))
    }

    /// Answers a request the simulator does not support (anything but a register
    /// read) as the unit would: its exception fault, else `IllegalFunction`.
    /// `None` where the unit does not answer.
    pub(super) fn reject(&self, unit: UnitId) -> Option<ExceptionCode> {
        if !self.inner.answering.load(Ordering::SeqCst) {
            return None;
        }
        let mut s = self.state(unit)?;
        match s.fault {
            Fault::Silent => None,
            Fault::Exception(code) => {
                s.served += 1;
                Some(code)
            }
            Fault::None | Fault::Slow(_) => {
                s.served += 1;
                Some(ExceptionCode::IllegalFunction)
            }
        }
    }

    /// Every distinct snapshot served to `unit`, oldest first (the last
    /// [`HISTORY_LIMIT`]).
    pub fn history(&self, unit: UnitId) -> Vec<Snapshot> {
        self.state(unit)
            .map(|s| s.history.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Requests the unit answered, with data or an exception.
    pub fn requests_served(&self, unit: UnitId) -> u64 {
        self.state(unit).map_or(0, |s| s.served)
    }

    fn state(&self, unit: UnitId) -> Option<MutexGuard<'_, UnitState>> {
        let index = usize::from(unit.0).checked_sub(1)?;
        let lock = self.inner.units.get(index)?;
        Some(lock.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes a new snapshot when there is none or the current one is a tick old.
    fn refresh(&self, s: &mut UnitState) {
        let now = Instant::now();
        let tick = Duration::from_nanos(self.inner.tick_nanos.load(Ordering::Relaxed));
        let elapsed = match s.taken_at {
            Some(at) if now.duration_since(at) < tick => return,
            Some(at) => now.duration_since(at),
            None => Duration::ZERO,
        };
        let profile = &self.inner.profile;
        let words = s.model.next(profile, elapsed);
        s.image = self.inner.map.image(profile, &words);
        s.taken_at = Some(now);
        let values = self.inner.map.values(profile, &s.image);
        let limit = self.inner.history_limit.load(Ordering::Relaxed);
        while s.history.len() >= limit && s.history.pop_front().is_some() {}
        s.history.push_back(Snapshot {
            at_ms: now_ms(),
            values,
        });
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::decode::{decode, encode};
    use crate::profile::{Counter, FieldType, RawValue};
    use crate::sim::fixtures::test_profile;

    const ALL: RegisterAddress = RegisterAddress(0);
    const LEN: u16 = 0x32;

    fn meters(tick: Duration) -> SimMeters {
        SimMeters::new(test_profile(), 3, 42).with_tick(tick)
    }

    fn read_all(m: &SimMeters, unit: u8) -> Vec<u16> {
        m.read(UnitId(unit), FunctionCode::ReadInput, ALL, LEN)
            .expect("full map is served")
    }

    #[test]
    fn every_field_round_trips_through_its_registers() {
        let m = meters(Duration::ZERO);
        let p = m.profile().clone();
        for _ in 0..200 {
            let image = read_all(&m, 2);
            let snap = m.history(UnitId(2)).pop().expect("a snapshot was taken");
            for f in &p.fields {
                let at = usize::from(f.address.0);
                let words = &image[at..at + usize::from(f.words())];
                let raw = decode(f.ty, f.order, words).expect("width matches");
                let value = snap.values[&f.name];
                assert_eq!(raw.as_f64() * f.scale + f.offset, value, "{}", f.name);
                // Re-encoding the recorded value gives the served words back.
                let raw_again = (value - f.offset) / f.scale;
                let again = match f.ty {
                    FieldType::F32 | FieldType::F64 => RawValue::Float(raw_again),
                    FieldType::Bit(_) => RawValue::Bit(raw_again != 0.0),
                    _ if raw_again < 0.0 => RawValue::Signed(raw_again.round() as i64),
                    _ => RawValue::Unsigned(raw_again.round() as u64),
                };
                let encoded = encode(f.ty, f.order, again);
                match f.ty {
                    FieldType::Bit(b) => assert_eq!(encoded[0] >> b & 1, words[0] >> b & 1),
                    _ => assert_eq!(encoded, words, "{}", f.name),
                }
            }
        }
    }

    #[test]
    fn polls_count_answered_reads_at_the_marker_until_answering_stops() {
        let m = meters(Duration::ZERO);
        m.count_polls_at(RegisterAddress(0x20));
        for _ in 0..3 {
            read_all(&m, 1);
            m.read(UnitId(1), FunctionCode::ReadInput, RegisterAddress(0x20), 4)
                .expect("served");
        }
        // An exception at the marker is not a poll answered.
        m.set_fault(UnitId(2), Fault::Exception(ExceptionCode::ServerDeviceBusy));
        assert!(m
            .read(UnitId(2), FunctionCode::ReadInput, RegisterAddress(0x20), 4)
            .is_err());
        assert_eq!(m.polls_served(UnitId(1)), 3);
        assert_eq!(m.polls_served(UnitId(2)), 0);
        m.stop_answering();
        assert!(m
            .read(UnitId(1), FunctionCode::ReadInput, RegisterAddress(0x20), 4)
            .is_err());
        assert_eq!(m.polls_served(UnitId(1)), 3);
    }

    #[test]
    fn history_keeps_at_most_its_limit() {
        let m = meters(Duration::ZERO).with_history_limit(2);
        for _ in 0..5 {
            read_all(&m, 1);
        }
        assert_eq!(m.history(UnitId(1)).len(), 2);
    }

    #[test]
    fn counters_strictly_increase_across_snapshots() {
        let m = meters(Duration::ZERO);
        for _ in 0..500 {
            read_all(&m, 1);
        }
        let history = m.history(UnitId(1));
        assert_eq!(history.len(), 500);
        let counters: Vec<_> = m
            .profile()
            .fields
            .iter()
            .filter(|f| matches!(f.counter, Counter::Monotonic { .. }))
            .map(|f| f.name.clone())
            .collect();
        assert_eq!(counters.len(), 3);
        for pair in history.windows(2) {
            for name in &counters {
                assert!(
                    pair[1].values[name] > pair[0].values[name],
                    "{name}: {} -> {}",
                    pair[0].values[name],
                    pair[1].values[name]
                );
            }
        }
    }

    #[test]
    fn values_stay_in_range_and_are_plausible() {
        let m = meters(Duration::ZERO);
        for _ in 0..1_000 {
            read_all(&m, 3);
        }
        let p = m.profile().clone();
        for snap in m.history(UnitId(3)) {
            for f in &p.fields {
                let v = snap.values[&f.name];
                if let Some((lo, hi)) = f.range {
                    assert!(v >= lo && v <= hi, "{} = {v} outside {lo}..={hi}", f.name);
                }
            }
            let v = |name: &str| snap.values[&FieldName::new(name).expect("valid name")];
            // Plausible bounds, with slack for `raw × scale` float products.
            let near = |name: &str, lo: f64, hi: f64| {
                let x = v(name);
                assert!(x >= lo - 1e-9 && x <= hi + 1e-9, "{name} = {x}");
            };
            near("voltage_l1", 227.0, 233.0);
            near("voltage_l1_l2", 395.0, 405.0);
            near("aux_voltage", 23.7, 24.3);
            near("current_l1", 0.5, 20.0);
            near("power_factor", 0.85, 1.0);
            near("frequency", 49.95, 50.05);
            near("temperature", 5.0, 30.0);
            near("flow", 0.0, 3.0);
            assert_eq!(v("meter_serial"), 10_000_003.0);
            let va = 230.0 * v("current_l1");
            assert!(v("power_total") <= va * 1.2 && v("power_total") >= va * 0.7);
        }
    }

    #[test]
    fn one_tick_serves_one_snapshot() {
        let m = meters(Duration::from_secs(3600));
        let a = m.read(UnitId(1), FunctionCode::ReadInput, ALL, 8);
        let b = m.read(
            UnitId(1),
            FunctionCode::ReadInput,
            RegisterAddress(0x20),
            0x12,
        );
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(m.history(UnitId(1)).len(), 1);
        assert_eq!(m.requests_served(UnitId(1)), 2);
        assert_eq!(read_all(&m, 1), read_all(&m, 1));
    }

    #[test]
    fn requests_outside_the_profile_get_exceptions() {
        let m = meters(DEFAULT_TICK);
        let read = |fc, start, count| m.read(UnitId(1), fc, RegisterAddress(start), count);
        assert_eq!(
            read(FunctionCode::ReadHolding, 0, 2),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            read(FunctionCode::ReadInput, 0x31, 2),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            read(FunctionCode::ReadInput, 0x100, 1),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            read(FunctionCode::ReadInput, 0, 0),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert!(
            m.history(UnitId(1)).is_empty(),
            "failed reads take no snapshot"
        );
        // Holes between fields read as zero.
        assert_eq!(read(FunctionCode::ReadInput, 9, 7), Ok(vec![0; 7]));
    }

    #[test]
    fn faults_and_unknown_units() {
        let m = meters(DEFAULT_TICK);
        let read = |unit| m.read(UnitId(unit), FunctionCode::ReadInput, ALL, 2);
        assert_eq!(read(0), Err(ExceptionCode::GatewayTargetDevice));
        assert_eq!(read(4), Err(ExceptionCode::GatewayTargetDevice));
        assert_eq!(m.fault(UnitId(4)), Fault::Silent);
        m.set_fault(UnitId(2), Fault::Exception(ExceptionCode::ServerDeviceBusy));
        assert_eq!(read(2), Err(ExceptionCode::ServerDeviceBusy));
        assert_eq!(m.requests_served(UnitId(2)), 1);
        m.set_fault(UnitId(3), Fault::Silent);
        assert_eq!(read(3), Err(ExceptionCode::GatewayTargetDevice));
        assert_eq!(m.requests_served(UnitId(3)), 0);
        m.set_fault(UnitId(3), Fault::None);
        assert!(read(3).is_ok());
    }

    #[test]
    fn history_is_bounded() {
        let m = meters(Duration::ZERO);
        for _ in 0..HISTORY_LIMIT + 5 {
            m.read(UnitId(1), FunctionCode::ReadInput, ALL, 1)
                .expect("served");
        }
        let history = m.history(UnitId(1));
        assert_eq!(history.len(), HISTORY_LIMIT);
        assert_eq!(m.requests_served(UnitId(1)), (HISTORY_LIMIT + 5) as u64);
    }
}

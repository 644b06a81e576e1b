//! The scheduler against a scripted transport, under paused tokio time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::{DeviceConfig, DeviceKind, ModbusConfig, ModbusDevice, Transport};
use crate::profile::Profile;
use crate::reading::DeviceId;
use crate::source::{RawSample, SourceContext};
use crate::telemetry::Metrics;
use crate::test_fixtures::VOLTAGE_PROFILE;

/// A second voltage far from the first (`VOLTAGE_PROFILE`): two reads per poll, at 0 and 1000.
const SECOND_FIELD: &str = r#"[[field]]
name = "voltage_l2"
register = 1000
type = "f32"
unit = "V"
category = "measurement"
grade = "L2"
"#;

#[derive(Debug, Clone, Copy)]
enum Behave {
    Answer,
    /// Never answers: the read times out.
    Silent,
    /// The read never completes (only cancellation ends it).
    Hang,
    /// Answers "busy" this many more times, then answers.
    Busy(u32),
    /// Rejects reads starting at this register as an illegal data address.
    IllegalAt(u16),
}

#[derive(Debug, Default)]
struct Script {
    units: HashMap<u8, Behave>,
    /// (when, unit, start) of every read sent.
    reads: Vec<(Instant, u8, u16)>,
    connects: Vec<Instant>,
    /// Connect attempts that fail before one succeeds; `u32::MAX`: never succeeds.
    connect_failures: u32,
    connect_hangs: bool,
    /// Observed at every read: whether no poll round was in progress.
    rounds: Option<crate::source::Rounds>,
    idle_during_reads: Vec<bool>,
}

#[derive(Debug, Clone, Default)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn with(units: &[(u8, Behave)]) -> Fake {
        let f = Fake::default();
        f.lock().units = units.iter().copied().collect();
        f
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap()
    }

    fn reads_of(&self, unit: u8) -> Vec<(Instant, u16)> {
        let s = self.lock();
        s.reads
            .iter()
            .filter(|r| r.1 == unit)
            .map(|r| (r.0, r.2))
            .collect()
    }
}

impl Connector for Fake {
    type Conn = Fake;

    async fn connect(&mut self, _limit: Duration) -> Result<Fake, PollError> {
        let hang = {
            let mut s = self.lock();
            s.connects.push(Instant::now());
            s.connect_hangs
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let mut s = self.lock();
        if s.connect_failures > 0 {
            s.connect_failures = s.connect_failures.saturating_sub(1);
            return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        }
        Ok(self.clone())
    }
}

impl Transact for Fake {
    const DISCARDS_LATE_REPLIES: bool = false;

    async fn read(&mut self, read: Read) -> Result<Vec<u16>, PollError> {
        let Read {
            unit, req, limit, ..
        } = read;
        let behave = {
            let mut s = self.lock();
            s.reads.push((Instant::now(), unit.0, req.start.0));
            if let Some(r) = s.rounds.clone() {
                s.idle_during_reads.push(r.is_idle());
            }
            let b = s.units.get(&unit.0).copied().unwrap_or(Behave::Answer);
            if let Behave::Busy(n) = b {
                s.units.insert(unit.0, Behave::Busy(n.saturating_sub(1)));
            }
            b
        };
        match behave {
            Behave::Silent => {
                tokio::time::sleep(limit).await;
                Err(PollError::Timeout(limit))
            }
            Behave::Hang => std::future::pending().await,
            Behave::Busy(n) if n > 0 => Err(PollError::Exception(ExceptionCode::ServerBusy)),
            Behave::IllegalAt(at) if at == req.start.0 => {
                Err(PollError::Exception(ExceptionCode::IllegalDataAddress))
            }
            _ => Ok(vec![0; usize::from(req.count)]),
        }
    }
}

fn device(unit: u8, interval: Duration, timeout: Duration) -> PolledDevice {
    let profile = Profile::parse(
        Path::new("t.toml"),
        &format!("{VOLTAGE_PROFILE}{SECOND_FIELD}"),
    )
    .unwrap();
    PolledDevice::new(DeviceConfig {
        id: DeviceId::new(format!("m{unit}")).unwrap(),
        profile: Arc::new(profile),
        kind: DeviceKind::Modbus(ModbusDevice {
            transport: Transport::Tcp {
                address: "fake:502".into(),
            },
            unit: UnitId(unit),
            poll_interval: interval,
            timeout,
        }),
        location: None,
        area: None,
        ratios: crate::profile::Ratios::UNITY,
    })
    .unwrap()
}

struct Run {
    metrics: Arc<Metrics>,
    samples_rx: mpsc::Receiver<RawSample>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Run {
    fn polls_ok(&self, unit: u8) -> u64 {
        self.metrics
            .device(&DeviceId::new(format!("m{unit}")).unwrap())
            .polls_ok
    }

    /// Cancels and checks the scheduler returns without any more time passing.
    async fn stop_promptly(self) {
        self.token.cancel();
        let started = Instant::now();
        self.task.await.unwrap();
        assert_eq!(Instant::now(), started, "stopped without waiting");
    }
}

fn start(fake: &Fake, devices: Vec<PolledDevice>, pacing: Pacing, backoff_max: Duration) -> Run {
    start_rounds(fake, devices, pacing, backoff_max, None)
}

/// [`start`], reporting rounds to `rounds`; `(rounds, false)`: a scheduler that does not
/// take part in rounds.
fn start_rounds(
    fake: &Fake,
    devices: Vec<PolledDevice>,
    pacing: Pacing,
    backoff_max: Duration,
    rounds: Option<(crate::source::Rounds, bool)>,
) -> Run {
    let (samples_tx, samples_rx) = mpsc::channel(10_000);
    let metrics = Arc::new(Metrics::default());
    let token = CancellationToken::new();
    let modbus = ModbusConfig {
        timeout: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(1),
        backoff_max,
    };
    let mut cx = SourceContext::new(samples_tx, metrics.clone(), &token, modbus);
    let mut holds = true;
    if let Some((r, h)) = rounds {
        fake.lock().rounds = Some(r.clone());
        cx = cx.with_rounds(r);
        holds = h;
    }
    let mut s = Scheduler::new("fake".into(), fake.clone(), devices, cx, pacing);
    if !holds {
        s = s.without_rounds();
    }
    Run {
        metrics,
        samples_rx,
        token,
        task: tokio::spawn(s.run()),
    }
}

const SECOND: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(100);

#[tokio::test(start_paused = true)]
async fn a_dead_device_backs_off_and_costs_at_most_one_timeout_per_cycle() {
    let fake = Fake::with(&[(2, Behave::Silent)]);
    let devices = (1..=3).map(|u| device(u, SECOND, TIMEOUT)).collect();
    let pacing = Pacing {
        min_failure_backoff: 3 * SECOND,
        backoff_covers_timeout: true,
    };
    let mut run = start(&fake, devices, pacing, Duration::from_secs(8));
    tokio::time::sleep(Duration::from_secs(60) + TIMEOUT).await;
    for u in [1, 3] {
        assert!(
            (58..=61).contains(&run.polls_ok(u)),
            "unit {u}: {}",
            run.polls_ok(u)
        );
    }
    let dead = fake.reads_of(2);
    // Two reads per poll are planned; a timeout ends the poll after the first.
    assert!(dead.iter().all(|r| r.1 == 0));
    let gaps: Vec<Duration> = dead.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(gaps.iter().all(|g| *g >= 3 * SECOND), "{gaps:?}");
    assert!(
        gaps.windows(2).all(|w| w[1] >= w[0]),
        "backoff grows: {gaps:?}"
    );
    // The delay runs from the end of the timed-out poll.
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(8) + TIMEOUT),
        "{gaps:?}"
    );
    assert!(
        (8..=12).contains(&dead.len()),
        "{} timeouts in 60 s",
        dead.len()
    );
    assert_eq!(
        run.metrics.device(&DeviceId::new("m2").unwrap()).timeouts,
        dead.len() as u64
    );
    let mut from = std::collections::HashSet::new();
    while let Ok(s) = run.samples_rx.try_recv() {
        from.insert(s.device.to_string());
    }
    assert_eq!(from.len(), 2, "{from:?}");
    run.stop_promptly().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_device_is_asked_again_up_to_busy_retries_times_per_slot() {
    let fake = Fake::with(&[(1, Behave::Busy(u32::MAX)), (2, Behave::Busy(2))]);
    let interval = Duration::from_secs(10);
    let devices = vec![device(1, interval, TIMEOUT), device(2, interval, TIMEOUT)];
    let mut run = start(&fake, devices, Pacing::default(), interval);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Always busy: the first try and BUSY_RETRIES quick retries, then its next slot.
    let tries = fake.reads_of(1);
    assert_eq!(tries.len() as u32, 1 + BUSY_RETRIES);
    assert!(tries.windows(2).all(|w| w[1].0 - w[0].0 == BUSY_DELAY));
    assert_eq!(run.polls_ok(1), 0);
    tokio::time::sleep(interval).await;
    assert_eq!(fake.reads_of(1).len() as u32, 2 * (1 + BUSY_RETRIES));
    // Busy twice, then answers: both reads, one sample, no backoff.
    assert_eq!(fake.reads_of(2).len(), 2 + 2 + 2);
    assert_eq!(run.polls_ok(2), 2);
    let s = run.samples_rx.try_recv().unwrap();
    assert_eq!(s.device.as_str(), "m2");
    run.stop_promptly().await;
}

#[tokio::test(start_paused = true)]
async fn an_illegal_address_is_skipped_then_retried_after_the_retry_period() {
    let fake = Fake::with(&[(1, Behave::IllegalAt(1000))]);
    let mut run = start(
        &fake,
        vec![device(1, SECOND, TIMEOUT)],
        Pacing::default(),
        SECOND,
    );
    tokio::time::sleep(ILLEGAL_ADDRESS_RETRY - SECOND).await;
    let at = |fake: &Fake, start| fake.reads_of(1).iter().filter(|r| r.1 == start).count();
    assert_eq!(at(&fake, 1000), 1, "rejected read sent again too soon");
    let polls = at(&fake, 0);
    assert!(polls >= 590, "{polls}");
    let stats = run.metrics.device(&DeviceId::new("m1").unwrap());
    assert_eq!(
        stats.exceptions as usize, polls,
        "every poll says why fields are missing"
    );
    assert_eq!(stats.timeouts, 0);
    assert_eq!(
        stats.last_error.as_deref(),
        Some("device exception: Illegal data address (0x02)")
    );
    // The rest of the image still arrives.
    let s = run.samples_rx.try_recv().unwrap();
    assert!(s.data != crate::source::SampleData::Registers(Default::default()));
    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(at(&fake, 1000), 2, "retried after ILLEGAL_ADDRESS_RETRY");
    run.stop_promptly().await;
}

#[tokio::test(start_paused = true)]
async fn cancellation_ends_a_connect_a_sleep_and_a_read_at_once() {
    let hanging = Fake::default();
    hanging.lock().connect_hangs = true;
    let run = start(
        &hanging,
        vec![device(1, SECOND, TIMEOUT)],
        Pacing::default(),
        SECOND,
    );
    tokio::time::sleep(SECOND).await;
    assert_eq!(hanging.lock().connects.len(), 1);
    run.stop_promptly().await;

    let fake = Fake::with(&[(1, Behave::Hang)]);
    let run = start(
        &fake,
        vec![device(1, SECOND, TIMEOUT)],
        Pacing::default(),
        SECOND,
    );
    tokio::time::sleep(SECOND).await;
    assert_eq!(fake.reads_of(1).len(), 1, "the read is in flight");
    run.stop_promptly().await;

    let fake = Fake::default();
    let hour = Duration::from_secs(3600);
    let run = start(
        &fake,
        vec![device(1, hour, TIMEOUT)],
        Pacing::default(),
        hour,
    );
    tokio::time::sleep(SECOND).await;
    assert_eq!(run.polls_ok(1), 1, "polled once, now sleeping");
    run.stop_promptly().await;
}

#[tokio::test(start_paused = true)]
async fn reconnect_backoff_grows_to_its_cap_and_resets_after_a_connect() {
    let fake = Fake::default();
    fake.lock().connect_failures = 8;
    let max = Duration::from_secs(10);
    let run = start(
        &fake,
        vec![device(1, SECOND, TIMEOUT)],
        Pacing::default(),
        max,
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    let connects = fake.lock().connects.clone();
    assert_eq!(connects.len(), 9, "eight failures, then connected");
    let gaps: Vec<Duration> = connects.windows(2).map(|w| w[1] - w[0]).collect();
    for (n, gap) in gaps.iter().enumerate() {
        // The n-th delay is jittered in [d/2, d], d = min(500 ms * 2^n, max), and the
        // next attempt waits for a due device (1 s cadence).
        let d = Duration::from_millis(500).saturating_mul(1 << n).min(max);
        assert!(
            *gap >= d / 2 && *gap <= d + SECOND,
            "attempt {n}: {gap:?} vs {d:?}"
        );
    }
    assert!(gaps[5..].iter().all(|g| *g >= max / 2), "{gaps:?}");
    let stats = run.metrics.device(&DeviceId::new("m1").unwrap());
    assert_eq!(stats.transport_errors, 8, "{stats:?}");
    assert!(stats.polls_ok > 0);
    run.stop_promptly().await;
}

#[tokio::test(start_paused = true)]
async fn paired_lanes_move_a_dead_device_to_probation_and_back() {
    let fake = Fake::with(&[(2, Behave::Silent)]);
    let (samples_tx, _samples_rx) = mpsc::channel(10_000);
    let metrics = Arc::new(Metrics::default());
    let token = CancellationToken::new();
    let modbus = ModbusConfig {
        timeout: SECOND,
        connect_timeout: SECOND,
        backoff_max: Duration::from_secs(4),
    };
    let cx = SourceContext::new(samples_tx, metrics.clone(), &token, modbus);
    let timeout = SECOND;
    let devices = (1..=3).map(|u| device(u, SECOND, timeout)).collect();
    let (to_probation, to_healthy) = HandOff::pair(3);
    let healthy = Scheduler::new(
        "h".into(),
        fake.clone(),
        devices,
        cx.clone(),
        Pacing::default(),
    )
    .with_hand_off(to_probation);
    let probation = Scheduler::new("p".into(), fake.clone(), Vec::new(), cx, Pacing::default())
        .with_hand_off(to_healthy);
    let task = tokio::spawn(async move {
        tokio::join!(healthy.run(), probation.run());
    });
    tokio::time::sleep(Duration::from_secs(30)).await;
    let ok = |u: u8| {
        metrics
            .device(&DeviceId::new(format!("m{u}")).unwrap())
            .polls_ok
    };
    // One timeout delayed the healthy devices once; after that, the dead meter's
    // timeouts run on the probation lane's own connection.
    for u in [1, 3] {
        assert!(ok(u) >= 28, "unit {u}: {}", ok(u));
    }
    let dead = metrics.device(&DeviceId::new("m2").unwrap());
    assert!(dead.timeouts >= 5 && dead.polls_ok == 0, "{dead:?}");
    fake.lock().units.insert(2, Behave::Answer);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let back = ok(2);
    assert!(
        back >= 4,
        "answers again and returns to the cadence: {back}"
    );
    token.cancel();
    task.await.unwrap();
}

/// issue 10 item 1: a scheduler holds its round from waking for due devices until every
/// due device is polled and its sample queued; between rounds it is idle, so the batcher
/// can seal the round's batch at once.
#[tokio::test(start_paused = true)]
async fn a_poll_round_lasts_until_every_due_device_is_polled() {
    let fake = Fake::with(&[]);
    let rounds = crate::source::Rounds::default();
    let devices = (1..=3).map(|u| device(u, SECOND, TIMEOUT)).collect();
    let mut run = start_rounds(
        &fake,
        devices,
        Pacing::default(),
        SECOND,
        Some((rounds.clone(), true)),
    );
    for round in 1..=3 {
        // Halfway between rounds.
        tokio::time::sleep(SECOND / 2).await;
        assert!(rounds.is_idle(), "round {round} is over");
        let mut queued = 0;
        while run.samples_rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 3, "round {round}: every device's sample is queued");
        tokio::time::sleep(SECOND / 2).await;
    }
    {
        let s = fake.lock();
        assert!(s.idle_during_reads.len() >= 3 * 2 * 3, "{}", s.reads.len());
        assert!(
            s.idle_during_reads.iter().all(|idle| !idle),
            "every read happens inside a round"
        );
    }
    run.stop_promptly().await;
    assert!(rounds.is_idle());
}

/// A scheduler that does not take part (a TCP endpoint's probation lane) never holds a
/// round, even while its dead device times out.
#[tokio::test(start_paused = true)]
async fn a_lane_without_rounds_never_holds_one() {
    let fake = Fake::with(&[(1, Behave::Silent)]);
    let rounds = crate::source::Rounds::default();
    let run = start_rounds(
        &fake,
        vec![device(1, SECOND, TIMEOUT)],
        Pacing::default(),
        SECOND,
        Some((rounds.clone(), false)),
    );
    tokio::time::sleep(SECOND * 3).await;
    {
        let s = fake.lock();
        assert!(!s.idle_during_reads.is_empty());
        assert!(s.idle_during_reads.iter().all(|idle| *idle));
    }
    run.stop_promptly().await;
}

/// An endpoint that is down holds no round while it connects, so it does not hold up the
/// batches of the endpoints that answer.
#[tokio::test(start_paused = true)]
async fn connecting_to_a_dead_endpoint_holds_no_round() {
    let fake = Fake::with(&[]);
    fake.lock().connect_hangs = true;
    let rounds = crate::source::Rounds::default();
    let run = start_rounds(
        &fake,
        vec![device(1, SECOND, TIMEOUT)],
        Pacing::default(),
        SECOND,
        Some((rounds.clone(), true)),
    );
    tokio::time::sleep(SECOND / 2).await;
    assert_eq!(fake.lock().connects.len(), 1, "the connect is under way");
    assert!(rounds.is_idle());
    run.stop_promptly().await;
}

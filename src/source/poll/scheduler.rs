//! [`Scheduler`]: polls the devices behind one connection, in order of their due time.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use super::{
    Connector, ErrorClass, ExceptionCode, PollError, Read, Transact, BUSY_DELAY, BUSY_RETRIES,
    ILLEGAL_ADDRESS_RETRY,
};
use crate::backoff::{Backoff, BackoffPolicy};
use crate::config::{DeviceConfig, ModbusDevice};
use crate::reading::now_ms;
use crate::source::modbus::{plan, ReadRequest};
use crate::source::{RawSample, RegisterImage, RoundGuard, SampleData, SourceContext};
use crate::telemetry::PollOutcome;

/// First reconnect delay; later ones double up to `modbus.backoff_max`.
const RECONNECT_INITIAL: Duration = Duration::from_millis(500);

/// One planned read of a device and whether the device accepts it.
#[derive(Debug, Clone)]
struct PlannedRead {
    req: ReadRequest,
    /// Until when the device's "illegal data address" keeps this read unsent.
    disabled_until: Option<Instant>,
    /// Whether the rejection was reported.
    reported: bool,
}

/// A device with its read plan and schedule.
#[derive(Debug)]
pub(crate) struct PolledDevice {
    pub config: DeviceConfig,
    modbus: ModbusDevice,
    reads: Vec<PlannedRead>,
    next_due: Instant,
    failures: u32,
    busy_streak: u32,
}

impl PolledDevice {
    /// `None` for a device that is not polled over Modbus.
    pub(crate) fn new(config: DeviceConfig) -> Option<Self> {
        let modbus = config.modbus()?.clone();
        let reads = plan(&config.profile)
            .into_iter()
            .map(|req| PlannedRead {
                req,
                disabled_until: None,
                reported: false,
            })
            .collect();
        Some(Self {
            config,
            modbus,
            reads,
            next_due: Instant::now(),
            failures: 0,
            busy_streak: 0,
        })
    }

    pub fn plan(&self) -> Vec<ReadRequest> {
        self.reads.iter().map(|r| r.req).collect()
    }

    pub(crate) fn poll_interval(&self) -> Duration {
        self.modbus.poll_interval
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.modbus.timeout
    }

    /// Next poll after an answered one: keep the cadence, skip missed slots.
    fn schedule_ok(&mut self, now: Instant) {
        if self.failures > 0 {
            info!(device = %self.config.id, "device answers again");
        }
        self.failures = 0;
        self.busy_streak = 0;
        let interval = self.modbus.poll_interval;
        self.next_due += interval;
        if self.next_due <= now {
            self.next_due = now + interval;
        }
    }

    /// Next poll after a failure: exponential backoff from the poll interval, capped at
    /// `max` (or the interval, if longer), never shorter than the pacing allows.
    fn schedule_failure(&mut self, now: Instant, max: Duration, pacing: Pacing, e: &PollError) {
        self.failures = self.failures.saturating_add(1);
        let interval = self.modbus.poll_interval;
        let factor = 1u32 << (self.failures - 1).min(10);
        let mut delay = interval
            .saturating_mul(factor)
            .min(max.max(interval))
            .max(pacing.min_failure_backoff);
        if pacing.backoff_covers_timeout {
            delay = delay.max(self.modbus.timeout);
        }
        if self.failures == 1 && matches!(e.class(), ErrorClass::Timeout | ErrorClass::BadFrame) {
            warn!(device = %self.config.id, unit = %self.modbus.unit, error = %e, "device stopped answering; probing it with backoff");
        }
        debug!(device = %self.config.id, unit = %self.modbus.unit, error = %e, retry_in = ?delay, "poll failed");
        self.next_due = now + delay;
    }
}

/// Transport-specific limits on the schedule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pacing {
    /// Shortest failure backoff. RTU: one bus cycle, so a dead meter costs at most one
    /// timeout per cycle. TCP: zero (its dead meters leave for the probation lane).
    pub min_failure_backoff: Duration,
    /// Whether a failing device also waits at least its timeout (RTU: its late reply
    /// may still be on the line; it must not be addressed again meanwhile).
    pub backoff_covers_timeout: bool,
}

/// When a device leaves a scheduler for the other one of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MoveWhen {
    /// After a poll that timed out (the healthy lane of a TCP endpoint).
    TimedOut,
    /// After a poll without failure (the probation lane).
    Answered,
}

/// Links two schedulers so devices can move between them (TCP healthy/probation lanes,
/// each with a connection of its own).
#[derive(Debug)]
pub(crate) struct HandOff {
    pub when: MoveWhen,
    pub out_tx: mpsc::Sender<PolledDevice>,
    pub in_rx: mpsc::Receiver<PolledDevice>,
}

impl HandOff {
    /// Two linked ends: the first moves devices that time out, the second devices that
    /// answer. `capacity` must hold every device.
    pub(crate) fn pair(capacity: usize) -> (HandOff, HandOff) {
        let (a_tx, a_rx) = mpsc::channel(capacity.max(1));
        let (b_tx, b_rx) = mpsc::channel(capacity.max(1));
        (
            HandOff {
                when: MoveWhen::TimedOut,
                out_tx: a_tx,
                in_rx: b_rx,
            },
            HandOff {
                when: MoveWhen::Answered,
                out_tx: b_tx,
                in_rx: a_rx,
            },
        )
    }
}

/// What one poll did.
#[derive(Debug, Clone, Copy)]
struct PollResult {
    answered: bool,
    timed_out: bool,
    broke: bool,
}

/// Polls the devices behind one connection; see the module docs.
#[derive(Debug)]
pub(crate) struct Scheduler<C> {
    name: String,
    connector: C,
    devices: Vec<PolledDevice>,
    cx: SourceContext,
    pacing: Pacing,
    hand_off: Option<HandOff>,
    /// Whether this scheduler's rounds hold up the batcher ([`crate::source::Rounds`]).
    holds_rounds: bool,
}

impl<C: Connector> Scheduler<C> {
    /// A scheduler named `name` in logs (the endpoint or bus).
    pub(crate) fn new(
        name: String,
        connector: C,
        devices: Vec<PolledDevice>,
        cx: SourceContext,
        pacing: Pacing,
    ) -> Self {
        Self {
            name,
            connector,
            devices,
            cx,
            pacing,
            hand_off: None,
            holds_rounds: true,
        }
    }

    /// Does not report its rounds: for a lane of failing devices, whose timeouts must not
    /// hold up the batches of the answering ones.
    pub(crate) fn without_rounds(mut self) -> Self {
        self.holds_rounds = false;
        self
    }

    /// Moves devices to and from another scheduler.
    pub(crate) fn with_hand_off(mut self, hand_off: HandOff) -> Self {
        self.hand_off = Some(hand_off);
        self
    }

    /// Polls until cancelled.
    pub(crate) async fn run(mut self) {
        let shutdown = self.cx.shutdown.clone();
        let mut reconnect = Backoff::new(BackoffPolicy {
            initial: RECONNECT_INITIAL,
            max: self.cx.modbus.backoff_max,
        });
        let mut conn: Option<C::Conn> = None;
        // Held from the first poll after waking until no device is due: see
        // `crate::source::Rounds`.
        let mut round: Option<RoundGuard> = None;
        loop {
            let due = self.devices.iter().map(|d| d.next_due).min();
            if due.map_or(true, |d| d > Instant::now()) {
                // Every sample of this round is queued: the round is over.
                round = None;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(d) = incoming(&mut self.hand_off) => {
                    self.devices.push(d);
                    continue;
                }
                e = closed(&mut conn) => {
                    warn!(source = %self.name, error = %e, "connection closed between polls");
                    if let Some(mut c) = conn.take() {
                        self.connector.observe(&mut c, false);
                    }
                    continue;
                }
                () = sleep_until(due.unwrap_or_else(far_future)), if due.is_some() => {}
            }
            let Some(idx) = (0..self.devices.len()).min_by_key(|&i| self.devices[i].next_due)
            else {
                continue;
            };
            if let Some(newer) = self.connector.replacement() {
                info!(source = %self.name, "peer reconnected; using the new connection");
                conn = Some(newer);
            }
            if conn.is_none() {
                let attempt = tokio::select! {
                    () = shutdown.cancelled() => break,
                    r = self.connector.connect(self.cx.modbus.connect_timeout) => r,
                };
                match attempt {
                    Ok(mut c) => {
                        reconnect.reset();
                        debug!(source = %self.name, "connected");
                        self.connector.observe(&mut c, true);
                        conn = Some(c);
                    }
                    Err(e) => {
                        let delay = reconnect.next_delay();
                        warn!(source = %self.name, error = %e, retry_in = ?delay, "connect failed");
                        let (now, at_ms) = (Instant::now(), now_ms());
                        let outcome = PollOutcome::Transport(e.to_string());
                        for d in &mut self.devices {
                            self.cx.metrics.record_poll(&d.config.id, at_ms, &outcome);
                            d.next_due = d.next_due.max(now + delay);
                        }
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            // From the first poll of a round; not while connecting, so an endpoint that is
            // down does not hold up the others' batches for its connect timeout.
            if round.is_none() && self.holds_rounds {
                round = Some(self.cx.rounds.begin());
            }
            let dev = &mut self.devices[idx];
            let result = tokio::select! {
                () = shutdown.cancelled() => break,
                r = poll(dev, c, &self.cx, self.pacing) => r,
            };
            self.connector.observe(c, !result.broke);
            if result.broke {
                conn = None;
            }
            self.hand_off_after(idx, result);
        }
        if let Some(mut c) = conn {
            self.connector.observe(&mut c, false);
        }
    }

    /// Moves device `idx` to the other scheduler if this poll says so.
    fn hand_off_after(&mut self, idx: usize, result: PollResult) {
        let Some(h) = &self.hand_off else { return };
        let moves = match h.when {
            MoveWhen::TimedOut => result.timed_out,
            MoveWhen::Answered => result.answered,
        };
        if !moves {
            return;
        }
        let dev = self.devices.swap_remove(idx);
        let id = dev.config.id.clone();
        debug!(device = %id, to = ?h.when, "device changes lanes");
        if h.out_tx.try_send(dev).is_err() {
            warn!(device = %id, "lane closed; device no longer polled");
        }
    }
}

/// Why the open connection closed while idle; pending without one.
async fn closed<T: Transact>(conn: &mut Option<T>) -> PollError {
    match conn {
        Some(c) => c.closed().await,
        None => std::future::pending().await,
    }
}

/// The next device handed over, if this scheduler is one of a pair; pending otherwise.
async fn incoming(hand_off: &mut Option<HandOff>) -> Option<PolledDevice> {
    match hand_off {
        Some(h) => h.in_rx.recv().await,
        None => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// Polls one device, records the outcome, sends the sample and reschedules the device.
async fn poll<T: Transact>(
    dev: &mut PolledDevice,
    conn: &mut T,
    cx: &SourceContext,
    pacing: Pacing,
) -> PollResult {
    let (id, unit) = (dev.config.id.clone(), dev.modbus.unit);
    let (function, limit) = (dev.config.profile.function, dev.modbus.timeout);
    let at_ms = now_ms();
    let mut image = RegisterImage::new();
    let mut failure: Option<PollError> = None;
    let mut exception: Option<ExceptionCode> = None;
    let mut busy = false;
    let started = Instant::now();
    for read in &mut dev.reads {
        if read.disabled_until.is_some_and(|t| t > started) {
            // Still rejected: its fields stay missing and the poll says why.
            exception = Some(ExceptionCode::IllegalDataAddress);
            continue;
        }
        let call = Read {
            unit,
            function,
            req: read.req,
            limit,
        };
        match conn.read(call).await {
            Ok(words) => {
                if read.disabled_until.take().is_some() {
                    info!(device = %id, start = %read.req.start, "read accepted again");
                }
                image.insert(read.req.start, words);
            }
            Err(PollError::Exception(code @ ExceptionCode::IllegalDataAddress)) => {
                exception = Some(code);
                read.disabled_until = Some(Instant::now() + ILLEGAL_ADDRESS_RETRY);
                if !read.reported {
                    read.reported = true;
                    warn!(
                        device = %id,
                        unit = %unit,
                        start = %read.req.start,
                        count = read.req.count,
                        retry_in = ?ILLEGAL_ADDRESS_RETRY,
                        "device rejects these registers (illegal data address); their fields are missing"
                    );
                }
            }
            Err(PollError::Exception(code)) if code.is_busy() => {
                exception = Some(code);
                busy = true;
                break;
            }
            Err(PollError::Exception(code)) => exception = Some(code),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let outcome = match (&failure, exception) {
        (Some(PollError::Timeout(_)), _) => PollOutcome::Timeout,
        (Some(e), _) => PollOutcome::Transport(e.to_string()),
        (None, Some(code)) => PollOutcome::Exception(PollError::Exception(code).to_string()),
        (None, None) => PollOutcome::Ok,
    };
    cx.metrics.record_poll(&id, at_ms, &outcome);
    let now = Instant::now();
    match &failure {
        Some(e) => dev.schedule_failure(now, cx.modbus.backoff_max, pacing, e),
        None if busy && dev.busy_streak < BUSY_RETRIES => {
            dev.busy_streak += 1;
            dev.next_due = now + BUSY_DELAY.min(dev.modbus.poll_interval / 4);
        }
        None => {
            if let Some(code) = exception {
                debug!(device = %id, unit = %unit, exception = %code, "poll answered with exception");
            }
            dev.schedule_ok(now);
        }
    }
    if !image.is_empty() {
        cx.send(RawSample {
            device: id,
            profile: dev.config.profile.clone(),
            at_ms,
            data: SampleData::Registers(image),
            ratios: dev.config.ratios,
        });
    }
    PollResult {
        answered: failure.is_none(),
        timed_out: matches!(failure, Some(PollError::Timeout(_))),
        broke: failure
            .as_ref()
            .is_some_and(|e| e.breaks_connection(T::DISCARDS_LATE_REPLIES)),
    }
}

//! The task that owns one RTU bus: [`RtuBus`].
//!
//! One transaction at a time, devices polled in order of their due time. Each device's
//! reads come from the shared read planner, and each poll produces the same
//! [`RawSample`] the Modbus TCP poller produces (a partial image when some reads
//! failed; the missing fields are reported as missing downstream).
//!
//! Fault isolation:
//! - A timeout (or a reply that never forms a valid frame) ends the device's poll; the
//!   device is retried with exponential backoff from its poll interval, and never
//!   sooner than one bus cycle, so a dead meter costs at most one timeout per cycle
//!   and the others keep their schedule. Backoff also keeps the device from being
//!   addressed again while a late reply of it may still be on the line.
//! - `0x05` acknowledge / `0x06` busy: the device is alive; the poll is retried
//!   shortly (up to [`BUSY_RETRIES`] times) before it waits for its next slot.
//! - `0x02` illegal data address: that read is disabled (its fields are missing),
//!   reported once at WARN, and retried only every [`ILLEGAL_ADDRESS_RETRY`].
//! - Other exceptions: counted; the poll goes on with the next read.
//! - A transport error closes the stream; the bus reopens it with backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::link::{LinkStats, RtuError, Transactor};
use super::timing::{BusBudget, LineTiming};
use super::transport::{BoxedStream, Link};
use crate::config::{DeviceConfig, ModbusConfig, ModbusDevice};
use crate::reading::now_ms;
use crate::source::modbus::{plan, ReadRequest};
use crate::source::{RawSample, RegisterImage, SampleData, SourceContext};
use crate::telemetry::{Metrics, PollOutcome};

pub use crate::source::modbus::ILLEGAL_ADDRESS_RETRY;
/// Quick retries of a poll answered "busy" before waiting for the next slot.
pub const BUSY_RETRIES: u32 = 3;
/// Delay before retrying a busy device.
const BUSY_DELAY: Duration = Duration::from_millis(200);

/// One planned read of a device and whether the device accepts it.
#[derive(Debug, Clone)]
struct PlannedRead {
    req: ReadRequest,
    disabled_until: Option<Instant>,
    reported: bool,
}

/// A device on the bus with its plan and schedule.
#[derive(Debug)]
pub struct RtuDevice {
    pub config: DeviceConfig,
    modbus: ModbusDevice,
    reads: Vec<PlannedRead>,
    next_due: Instant,
    failures: u32,
    busy_streak: u32,
}

impl RtuDevice {
    /// `None` for a device that is not polled over Modbus.
    pub fn new(config: DeviceConfig) -> Option<Self> {
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
}

/// What the bus reports to tests and `check` about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BusStatus {
    /// Transactions and discarded bytes so far.
    pub link: LinkStats,
    pub connected: bool,
}

/// Polls every device on one RTU bus.
#[derive(Debug)]
pub struct RtuBus {
    link: Link,
    timing: LineTiming,
    devices: Vec<RtuDevice>,
    cfg: ModbusConfig,
    heartbeats: Vec<Vec<u8>>,
    samples_tx: mpsc::Sender<RawSample>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    status_tx: watch::Sender<BusStatus>,
}

impl RtuBus {
    pub fn new(
        link: Link,
        timing: LineTiming,
        devices: Vec<DeviceConfig>,
        heartbeats: Vec<Vec<u8>>,
        cx: SourceContext,
    ) -> Self {
        let (status_tx, _) = watch::channel(BusStatus::default());
        Self {
            link,
            timing,
            devices: devices.into_iter().filter_map(RtuDevice::new).collect(),
            cfg: cx.modbus,
            heartbeats,
            samples_tx: cx.samples_tx,
            metrics: cx.metrics,
            shutdown: cx.shutdown,
            status_tx,
        }
    }

    /// The wire-time budget of this bus as configured.
    pub fn budget(&self) -> BusBudget {
        let plans: Vec<(Vec<ReadRequest>, Duration)> = self
            .devices
            .iter()
            .map(|d| (d.plan(), d.modbus.poll_interval))
            .collect();
        BusBudget::compute(&self.timing, plans.iter().map(|(p, i)| (p.as_slice(), *i)))
    }

    /// Link counters, updated after every poll.
    pub fn status(&self) -> watch::Receiver<BusStatus> {
        self.status_tx.subscribe()
    }

    pub async fn run(mut self) {
        let budget = self.budget();
        info!(
            bus = %self.link,
            devices = self.devices.len(),
            cycle = ?budget.cycle,
            load = budget.load,
            "rtu bus started"
        );
        if budget.overloaded() {
            warn!(
                bus = %self.link,
                cycle = ?budget.cycle,
                load = budget.load,
                "poll intervals ask for more than the baud rate carries; polls will run late"
            );
        }
        let mut open_failures: u32 = 0;
        let mut stats = LinkStats::default();
        'outer: loop {
            let stream = tokio::select! {
                () = self.shutdown.cancelled() => break,
                r = self.link.open(self.cfg.connect_timeout) => r,
            };
            let stream = match stream {
                Ok(s) => {
                    open_failures = 0;
                    info!(bus = %self.link, "rtu bus link open");
                    s
                }
                Err(e) => {
                    open_failures = open_failures.saturating_add(1);
                    let delay = reopen_backoff(open_failures, self.cfg.backoff_max);
                    warn!(bus = %self.link, error = %e, retry_in = ?delay, "rtu bus link failed");
                    for d in &self.devices {
                        self.metrics.record_poll(
                            &d.config.id,
                            now_ms(),
                            &PollOutcome::Transport(e.to_string()),
                        );
                    }
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            let mut tr = Transactor::new(stream, self.timing, self.heartbeats.clone());
            self.status_tx.send_replace(BusStatus {
                link: stats,
                connected: true,
            });
            loop {
                let due = self.devices.iter().map(|d| d.next_due).min();
                let Some(due) = due else {
                    self.shutdown.cancelled().await;
                    break 'outer;
                };
                tokio::select! {
                    () = self.shutdown.cancelled() => break 'outer,
                    () = sleep_until(due) => {}
                }
                if let Some(newer) = self.link.newer_session() {
                    info!(bus = %self.link, "dtu reconnected; using the new connection");
                    tr = Transactor::new(newer, self.timing, self.heartbeats.clone());
                }
                let Some(idx) = (0..self.devices.len()).min_by_key(|&i| self.devices[i].next_due)
                else {
                    continue;
                };
                let token = self.shutdown.clone();
                let broken = tokio::select! {
                    () = token.cancelled() => break 'outer,
                    broken = self.poll_device(&mut tr, idx, &budget) => broken,
                };
                stats = add(stats, tr.stats);
                tr.stats = LinkStats::default();
                self.status_tx.send_replace(BusStatus {
                    link: stats,
                    connected: !broken,
                });
                if broken {
                    break;
                }
            }
            self.status_tx.send_replace(BusStatus {
                link: stats,
                connected: false,
            });
        }
        info!(bus = %self.link, "rtu bus stopped");
    }

    /// Polls one device and reschedules it. Returns true when the link broke.
    async fn poll_device(
        &mut self,
        tr: &mut Transactor<BoxedStream>,
        idx: usize,
        budget: &BusBudget,
    ) -> bool {
        let dev = &mut self.devices[idx];
        let cfg = dev.config.clone();
        let modbus = dev.modbus.clone();
        let at_ms = now_ms();
        let mut image = RegisterImage::new();
        let mut failure: Option<RtuError> = None;
        let mut exception: Option<u8> = None;
        let mut busy = false;
        let now = Instant::now();
        for read in &mut dev.reads {
            if read.disabled_until.is_some_and(|t| t > now) {
                // Still rejected: its fields stay missing and the poll says why.
                exception = Some(2);
                continue;
            }
            match tr
                .read(modbus.unit, cfg.profile.function, read.req, modbus.timeout)
                .await
            {
                Ok(words) => {
                    if read.disabled_until.take().is_some() {
                        info!(device = %cfg.id, start = %read.req.start, "read accepted again");
                    }
                    image.insert(read.req.start, words);
                }
                Err(RtuError::Exception(2)) => {
                    exception = Some(2);
                    read.disabled_until = Some(Instant::now() + ILLEGAL_ADDRESS_RETRY);
                    if !read.reported {
                        read.reported = true;
                        warn!(
                            device = %cfg.id,
                            unit = %modbus.unit,
                            start = %read.req.start,
                            count = read.req.count,
                            retry_in = ?ILLEGAL_ADDRESS_RETRY,
                            "device rejects these registers (illegal data address); their fields are missing"
                        );
                    }
                }
                Err(RtuError::Exception(code @ (5 | 6))) => {
                    exception = Some(code);
                    busy = true;
                    break;
                }
                Err(RtuError::Exception(code)) => exception = Some(code),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let now = Instant::now();
        let outcome = match &failure {
            Some(RtuError::Timeout(_)) => PollOutcome::Timeout,
            Some(e) => PollOutcome::Transport(e.to_string()),
            None => match exception {
                Some(code) => PollOutcome::Exception(format!("device exception 0x{code:02X}")),
                None => PollOutcome::Ok,
            },
        };
        self.metrics.record_poll(&cfg.id, at_ms, &outcome);
        match &failure {
            Some(RtuError::Timeout(_) | RtuError::BadFrame(_)) => {
                dev.failures = dev.failures.saturating_add(1);
                let factor = 1u32 << (dev.failures - 1).min(10);
                let delay = modbus
                    .poll_interval
                    .saturating_mul(factor)
                    .min(self.cfg.backoff_max.max(modbus.poll_interval))
                    .max(budget.cycle)
                    .max(modbus.timeout);
                if dev.failures == 1 {
                    warn!(device = %cfg.id, unit = %modbus.unit, error = %failure.as_ref().map(ToString::to_string).unwrap_or_default(), "device stopped answering; probing it with backoff");
                }
                debug!(device = %cfg.id, retry_in = ?delay, "rtu poll failed");
                dev.next_due = now + delay;
            }
            _ if busy && dev.busy_streak < BUSY_RETRIES => {
                dev.busy_streak += 1;
                dev.next_due = now + BUSY_DELAY.min(modbus.poll_interval / 4);
            }
            _ => {
                if dev.failures > 0 && failure.is_none() {
                    info!(device = %cfg.id, "device answers again");
                }
                if failure.is_none() {
                    dev.failures = 0;
                }
                dev.busy_streak = 0;
                dev.next_due += modbus.poll_interval;
                if dev.next_due <= now {
                    dev.next_due = now + modbus.poll_interval;
                }
            }
        }
        if !image.is_empty() {
            self.metrics.samples_polled.inc();
            let sample = RawSample {
                device: cfg.id.clone(),
                profile: cfg.profile.clone(),
                at_ms,
                data: SampleData::Registers(image),
                ratios: cfg.ratios,
            };
            // Same policy as the TCP poller: drop the newest sample when downstream is full.
            if self.samples_tx.try_send(sample).is_err() {
                self.metrics.samples_dropped.inc();
            }
        }
        failure.as_ref().is_some_and(RtuError::breaks_link)
    }
}

/// Delay before reopening a link: exponential from 250 ms, jittered, capped.
fn reopen_backoff(failures: u32, max: Duration) -> Duration {
    use rand::Rng;
    let base = Duration::from_millis(250)
        .saturating_mul(1u32 << failures.min(12))
        .min(max);
    base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

fn add(a: LinkStats, b: LinkStats) -> LinkStats {
    LinkStats {
        requests: a.requests + b.requests,
        replies: a.replies + b.replies,
        discarded_bytes: a.discarded_bytes + b.discarded_bytes,
    }
}

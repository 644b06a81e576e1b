//! The per-endpoint polling task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_modbus::{Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{plan, ModbusError, ReadRequest};
use crate::config::{DeviceConfig, ModbusConfig, ModbusDevice};
use crate::profile::FunctionCode;
use crate::reading::now_ms;
use crate::source::{RawSample, RegisterImage, SampleData, SourceContext};
use crate::telemetry::{Metrics, PollOutcome};

/// A device with its read plan and schedule.
#[derive(Debug)]
pub struct PolledDevice {
    pub config: DeviceConfig,
    modbus: ModbusDevice,
    plan: Vec<ReadRequest>,
    /// Per planned read: until when the device's "illegal data address" keeps it unsent,
    /// and whether that was reported.
    rejected: Vec<(Option<Instant>, bool)>,
    next_due: Instant,
    failures: u32,
}

impl PolledDevice {
    /// `None` for a device that is not polled over Modbus.
    pub fn new(config: DeviceConfig) -> Option<Self> {
        let modbus = config.modbus()?.clone();
        let plan = plan(&config.profile);
        Some(Self {
            config,
            modbus,
            rejected: vec![(None, false); plan.len()],
            plan,
            next_due: Instant::now(),
            failures: 0,
        })
    }

    pub fn plan(&self) -> &[ReadRequest] {
        &self.plan
    }

    /// Next poll after a successful one: keep the cadence, skip missed slots.
    fn schedule_ok(&mut self, now: Instant) {
        self.failures = 0;
        self.next_due += self.modbus.poll_interval;
        if self.next_due <= now {
            self.next_due = now + self.modbus.poll_interval;
        }
    }

    /// Next poll after a failure: exponential backoff from the poll interval.
    fn schedule_failure(&mut self, now: Instant, max: Duration) {
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32 << self.failures.saturating_sub(1).min(10);
        let delay = self
            .modbus
            .poll_interval
            .saturating_mul(factor)
            .min(max.max(self.modbus.poll_interval));
        self.next_due = now + delay;
    }
}

/// Which lane of an endpoint a device is polled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneKind {
    /// Devices that answer.
    Healthy,
    /// Devices that stopped answering: polled with backoff over a connection of their own,
    /// so their timeouts never hold up the healthy devices.
    Probation,
}

/// Polls every device behind one Modbus TCP endpoint.
///
/// The task runs two lanes concurrently, each with its own connection: healthy devices
/// are polled one transaction at a time on the first; a device whose request times out
/// moves to the probation lane and comes back after its first good poll. A dead meter
/// therefore costs the healthy ones at most the one timeout that revealed it.
#[derive(Debug)]
pub struct ModbusPoller {
    address: String,
    devices: Vec<PolledDevice>,
    cx: SourceContext,
}

impl ModbusPoller {
    pub fn new(address: String, devices: Vec<DeviceConfig>, cx: SourceContext) -> Self {
        Self {
            address,
            devices: devices.into_iter().filter_map(PolledDevice::new).collect(),
            cx,
        }
    }

    pub async fn run(self) {
        info!(endpoint = %self.address, devices = self.devices.len(), "modbus poller started");
        let capacity = self.devices.len().max(1);
        let (to_probation_tx, to_probation_rx) = mpsc::channel(capacity);
        let (to_healthy_tx, to_healthy_rx) = mpsc::channel(capacity);
        let lane = |kind, devices| Lane {
            kind,
            address: self.address.clone(),
            devices,
            cfg: self.cx.modbus,
            samples_tx: self.cx.samples_tx.clone(),
            metrics: self.cx.metrics.clone(),
            shutdown: self.cx.shutdown.clone(),
        };
        let healthy = lane(LaneKind::Healthy, self.devices);
        let probation = lane(LaneKind::Probation, Vec::new());
        tokio::join!(
            healthy.run(to_probation_tx, to_healthy_rx),
            probation.run(to_healthy_tx, to_probation_rx)
        );
        info!(endpoint = %self.address, "modbus poller stopped");
    }
}

/// One connection to the endpoint and the devices polled over it.
#[derive(Debug)]
struct Lane {
    kind: LaneKind,
    address: String,
    devices: Vec<PolledDevice>,
    cfg: ModbusConfig,
    samples_tx: mpsc::Sender<RawSample>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Lane {
    async fn run(
        mut self,
        other_tx: mpsc::Sender<PolledDevice>,
        mut incoming_rx: mpsc::Receiver<PolledDevice>,
    ) {
        let mut conn: Option<Context> = None;
        let mut connect_failures: u32 = 0;
        loop {
            let due = self.devices.iter().map(|d| d.next_due).min();
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(d) = incoming_rx.recv() => {
                    self.devices.push(d);
                    continue;
                }
                _ = sleep_until(due.unwrap_or_else(far_future)), if due.is_some() => {}
            }
            let Some(idx) = (0..self.devices.len()).min_by_key(|&i| self.devices[i].next_due)
            else {
                continue;
            };
            if conn.is_none() {
                match connect(&self.address, self.cfg.connect_timeout).await {
                    Ok(c) => {
                        connect_failures = 0;
                        conn = Some(c);
                    }
                    Err(e) => {
                        connect_failures = connect_failures.saturating_add(1);
                        let delay = backoff(connect_failures, self.cfg.backoff_max);
                        warn!(endpoint = %self.address, error = %e, retry_in = ?delay, "modbus connect failed");
                        let now = Instant::now();
                        for d in &mut self.devices {
                            self.metrics.record_poll(
                                &d.config.id,
                                now_ms(),
                                &PollOutcome::Transport(e.to_string()),
                            );
                            d.next_due = d.next_due.max(now + delay);
                        }
                        continue;
                    }
                }
            }
            let Some(ctx) = conn.as_mut() else { continue };
            let outcome = self.poll_device(ctx, idx).await;
            if outcome.breaks_connection {
                if let Some(mut c) = conn.take() {
                    let _ = timeout(Duration::from_millis(100), c.disconnect()).await;
                }
            }
            let moves = match self.kind {
                LaneKind::Healthy => outcome.timed_out,
                LaneKind::Probation => outcome.ok,
            };
            if moves {
                let dev = self.devices.swap_remove(idx);
                let id = dev.config.id.clone();
                match self.kind {
                    LaneKind::Healthy => {
                        warn!(device = %id, "device stopped answering; polling it on probation")
                    }
                    LaneKind::Probation => info!(device = %id, "device answers again"),
                }
                if other_tx.try_send(dev).is_err() {
                    warn!(device = %id, "lane closed; device no longer polled");
                }
            }
        }
    }

    /// Polls one device and reschedules it.
    async fn poll_device(&mut self, ctx: &mut Context, idx: usize) -> PollResult {
        let dev = &mut self.devices[idx];
        let cfg = dev.config.clone();
        let modbus = dev.modbus.clone();
        ctx.set_slave(Slave(modbus.unit.0));
        let at_ms = now_ms();
        let mut image = RegisterImage::new();
        let mut failure: Option<ModbusError> = None;
        let mut exception: Option<ModbusError> = None;
        let started = Instant::now();
        for (req, (until, reported)) in dev.plan.iter().zip(dev.rejected.iter_mut()) {
            if until.is_some_and(|t| t > started) {
                // Still rejected: its fields stay missing and the poll says why.
                exception = Some(ModbusError::Exception(
                    tokio_modbus::ExceptionCode::IllegalDataAddress,
                ));
                continue;
            }
            match read(ctx, cfg.profile.function, *req, modbus.timeout).await {
                Ok(words) => {
                    if until.take().is_some() {
                        info!(device = %cfg.id, start = %req.start, "read accepted again");
                    }
                    image.insert(req.start, words);
                }
                Err(e) if e.breaks_connection() => {
                    failure = Some(e);
                    break;
                }
                Err(ModbusError::Exception(tokio_modbus::ExceptionCode::IllegalDataAddress)) => {
                    *until = Some(Instant::now() + super::ILLEGAL_ADDRESS_RETRY);
                    if !*reported {
                        *reported = true;
                        warn!(
                            device = %cfg.id,
                            unit = %modbus.unit,
                            start = %req.start,
                            count = req.count,
                            retry_in = ?super::ILLEGAL_ADDRESS_RETRY,
                            "device rejects these registers (illegal data address); their fields are missing"
                        );
                    }
                    exception = Some(ModbusError::Exception(
                        tokio_modbus::ExceptionCode::IllegalDataAddress,
                    ));
                }
                Err(e) => exception = Some(e),
            }
        }
        let now = Instant::now();
        let outcome = match (&failure, &exception) {
            (Some(ModbusError::Timeout(_)), _) => PollOutcome::Timeout,
            (Some(e), _) => PollOutcome::Transport(e.to_string()),
            (None, Some(e)) => PollOutcome::Exception(e.to_string()),
            (None, None) => PollOutcome::Ok,
        };
        self.metrics.record_poll(&cfg.id, at_ms, &outcome);
        if let Some(e) = &failure {
            debug!(device = %cfg.id, unit = %modbus.unit, error = %e, "poll failed");
            dev.schedule_failure(now, self.cfg.backoff_max);
        } else {
            if let Some(e) = &exception {
                debug!(device = %cfg.id, unit = %modbus.unit, error = %e, "poll answered with exception");
            }
            dev.schedule_ok(now);
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
            // Policy when the transforms fall behind: drop the newest sample and count it;
            // polling never blocks on downstream back-pressure.
            if self.samples_tx.try_send(sample).is_err() {
                self.metrics.samples_dropped.inc();
            }
        }
        PollResult {
            ok: failure.is_none(),
            timed_out: matches!(failure, Some(ModbusError::Timeout(_))),
            breaks_connection: failure.is_some(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PollResult {
    ok: bool,
    timed_out: bool,
    breaks_connection: bool,
}

async fn connect(address: &str, limit: Duration) -> Result<Context, ModbusError> {
    let addr: SocketAddr = tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| ModbusError::Protocol(format!("{address} resolves to no address")))?;
    let stream = timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| ModbusError::Timeout(limit))??;
    let _ = stream.set_nodelay(true);
    debug!(endpoint = %address, "modbus connected");
    Ok(tokio_modbus::client::tcp::attach_slave(stream, Slave(1)))
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// One read with a timeout, its reply checked against the request.
async fn read(
    ctx: &mut Context,
    function: FunctionCode,
    req: ReadRequest,
    limit: Duration,
) -> Result<Vec<u16>, ModbusError> {
    let request = match function {
        FunctionCode::ReadHolding => Request::ReadHoldingRegisters(req.start.0, req.count),
        FunctionCode::ReadInput => Request::ReadInputRegisters(req.start.0, req.count),
    };
    let reply = timeout(limit, ctx.call(request))
        .await
        .map_err(|_| ModbusError::Timeout(limit))?;
    let response = match reply {
        Ok(Ok(r)) => r,
        Ok(Err(code)) => return Err(ModbusError::Exception(code)),
        Err(tokio_modbus::Error::Transport(e)) => return Err(ModbusError::Transport(e)),
        Err(tokio_modbus::Error::Protocol(e)) => return Err(ModbusError::Protocol(e.to_string())),
    };
    let words = match response {
        Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => w,
        other => {
            return Err(ModbusError::Protocol(format!(
                "unexpected response {other:?}"
            )))
        }
    };
    if words.len() != usize::from(req.count) {
        return Err(ModbusError::Protocol(format!(
            "asked for {} registers at {}, got {}",
            req.count,
            req.start,
            words.len()
        )));
    }
    Ok(words)
}

/// Exponential backoff with full jitter between half and the whole step.
fn backoff(failures: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(250)
        .saturating_mul(1u32 << failures.min(12))
        .min(max);
    let jitter = rand::thread_rng().gen_range(0.5..=1.0);
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        for f in 0..40 {
            assert!(backoff(f, Duration::from_secs(30)) <= Duration::from_secs(30));
        }
        assert!(backoff(1, Duration::from_secs(30)) >= Duration::from_millis(250));
    }
}

//! The task that owns one RTU bus: [`RtuBus`], a thin transport under the shared
//! polling core (`source::poll`).
//!
//! One transaction at a time, devices polled in order of their due time, each poll
//! producing the same [`RawSample`](crate::source::RawSample) as Modbus TCP. What is
//! RTU's own: opening the serial port, RTU-over-TCP stream or DTU session (a DTU that
//! whose session went silent is replaced by its next registration before the next poll;
//! the stream is read between polls too, so a closed one is noticed at once), the [`Transactor`]
//! (framing, draining late replies, so a timeout does not close the stream), the bus
//! budget, and the pacing rule that a failing device is retried never sooner than one
//! bus cycle (nor its own timeout), so a dead meter costs at most one timeout per cycle
//! and its late reply is never on the line when it is addressed again.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::{info, warn};

use super::link::{LinkStats, RtuError, Transactor};
use super::timing::{BusBudget, LineTiming};
use super::transport::{BoxedStream, Link};
use crate::config::DeviceConfig;
use crate::source::modbus::ReadRequest;
use crate::source::poll::{Connector, Pacing, PollError, PolledDevice, Read, Scheduler, Transact};
use crate::source::SourceContext;

/// Poll cycles a DTU session may be silent before a new registration may replace it.
const DTU_SILENT_CYCLES: u32 = 3;

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
    devices: Vec<PolledDevice>,
    heartbeats: Vec<Vec<u8>>,
    cx: SourceContext,
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
            devices: devices.into_iter().filter_map(PolledDevice::new).collect(),
            heartbeats,
            cx,
            status_tx,
        }
    }

    /// The wire-time budget of this bus as configured.
    pub fn budget(&self) -> BusBudget {
        let plans: Vec<(Vec<ReadRequest>, Duration)> = self
            .devices
            .iter()
            .map(|d| (d.plan(), d.poll_interval()))
            .collect();
        BusBudget::compute(&self.timing, plans.iter().map(|(p, i)| (p.as_slice(), *i)))
    }

    /// Link counters, updated after every poll.
    pub fn status(&self) -> watch::Receiver<BusStatus> {
        self.status_tx.subscribe()
    }

    pub async fn run(self) {
        let budget = self.budget();
        let name = self.link.to_string();
        info!(
            bus = %name,
            devices = self.devices.len(),
            cycle = ?budget.cycle,
            load = budget.load,
            "rtu bus started"
        );
        if budget.overloaded() {
            warn!(
                bus = %name,
                cycle = ?budget.cycle,
                load = budget.load,
                "poll intervals ask for more than the baud rate carries; polls will run late"
            );
        }
        let pacing = Pacing {
            min_failure_backoff: budget.cycle,
            backoff_covers_timeout: true,
        };
        // A DTU session that hears nothing (no reply, no heartbeat) for a few poll
        // cycles may be replaced by a new registration.
        let longest = self
            .devices
            .iter()
            .map(|d| d.poll_interval() + d.timeout())
            .max()
            .unwrap_or_default();
        self.link
            .set_silence_limit(DTU_SILENT_CYCLES * (longest + budget.cycle));
        let connector = BusLink {
            link: self.link,
            timing: self.timing,
            heartbeats: self.heartbeats,
            stats: LinkStats::default(),
            status_tx: self.status_tx,
        };
        Scheduler::new(name.clone(), connector, self.devices, self.cx, pacing)
            .run()
            .await;
        info!("rtu bus stopped");
    }
}

/// Opens the bus's stream and publishes its counters.
#[derive(Debug)]
struct BusLink {
    link: Link,
    timing: LineTiming,
    heartbeats: Vec<Vec<u8>>,
    /// Counters of the streams before the current one's last poll.
    stats: LinkStats,
    status_tx: watch::Sender<BusStatus>,
}

impl BusLink {
    fn transactor(&self, stream: BoxedStream) -> Transactor<BoxedStream> {
        Transactor::new(stream, self.timing, self.heartbeats.clone())
    }
}

impl Connector for BusLink {
    type Conn = Transactor<BoxedStream>;

    async fn connect(&mut self, limit: Duration) -> Result<Self::Conn, PollError> {
        let stream = self.link.open(limit).await?;
        info!("rtu bus link open");
        Ok(self.transactor(stream))
    }

    fn replacement(&mut self) -> Option<Self::Conn> {
        let newer = self.link.newer_session()?;
        Some(self.transactor(newer))
    }

    fn observe(&mut self, conn: &mut Self::Conn, up: bool) {
        if up {
            self.link.touch(conn.last_heard());
        } else {
            self.link.closed();
        }
        self.stats = add(self.stats, std::mem::take(&mut conn.stats));
        self.status_tx.send_replace(BusStatus {
            link: self.stats,
            connected: up,
        });
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transact for Transactor<S> {
    /// The transactor drains the line after a timeout or bad frame.
    const DISCARDS_LATE_REPLIES: bool = true;

    async fn read(&mut self, r: Read) -> Result<Vec<u16>, PollError> {
        Transactor::read(self, r.unit, r.function, r.req, r.limit)
            .await
            .map_err(PollError::from)
    }

    async fn closed(&mut self) -> PollError {
        Transactor::closed(self).await.into()
    }
}

impl From<RtuError> for PollError {
    fn from(e: RtuError) -> Self {
        match e {
            RtuError::Exception(code) => PollError::Exception(code.into()),
            RtuError::Timeout(limit) => PollError::Timeout(limit),
            // A noisy line is the bus's problem, not the connection's: keep the stream.
            e @ (RtuError::BadFrame(_) | RtuError::Noisy(_)) => PollError::BadFrame(e.to_string()),
            RtuError::Io(e) => PollError::Transport(e),
        }
    }
}

fn add(a: LinkStats, b: LinkStats) -> LinkStats {
    LinkStats {
        requests: a.requests + b.requests,
        replies: a.replies + b.replies,
        discarded_bytes: a.discarded_bytes + b.discarded_bytes,
    }
}

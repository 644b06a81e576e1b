//! The Modbus TCP transport: connecting an endpoint and one read over tokio-modbus.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::info;

use super::mbap::MbapClient;
use crate::config::DeviceConfig;
use crate::source::poll::{
    Connector, HandOff, Pacing, PollError, PolledDevice, Read, Scheduler, Transact,
};
use crate::source::SourceContext;
use crate::telemetry::Metrics;

/// Polls every device behind one Modbus TCP endpoint.
///
/// Two lanes run concurrently, each a [`Scheduler`] with its own connection: healthy
/// devices are polled one transaction at a time on the first; a device whose request
/// times out moves to the probation lane and comes back after its first good poll. A
/// dead meter therefore costs the healthy ones at most the one timeout that revealed it.
#[derive(Debug)]
pub(crate) struct ModbusPoller {
    address: String,
    devices: Vec<PolledDevice>,
    cx: SourceContext,
}

impl ModbusPoller {
    pub(crate) fn new(address: String, devices: Vec<DeviceConfig>, cx: SourceContext) -> Self {
        Self {
            address,
            devices: devices.into_iter().filter_map(PolledDevice::new).collect(),
            cx,
        }
    }

    pub(crate) async fn run(self) {
        info!(devices = self.devices.len(), "modbus poller started");
        let (to_probation, to_healthy) = HandOff::pair(self.devices.len());
        let lane = |devices| {
            Scheduler::new(
                format!("tcp://{}", self.address),
                TcpEndpoint {
                    address: self.address.clone(),
                    metrics: self.cx.metrics.clone(),
                },
                devices,
                self.cx.clone(),
                Pacing::default(),
            )
        };
        let healthy = lane(self.devices).with_hand_off(to_probation);
        let probation = lane(Vec::new()).with_hand_off(to_healthy).without_rounds();
        tokio::join!(healthy.run(), probation.run());
        info!("modbus poller stopped");
    }
}

/// Connects to one Modbus TCP endpoint.
#[derive(Debug)]
struct TcpEndpoint {
    address: String,
    metrics: Arc<Metrics>,
}

impl Connector for TcpEndpoint {
    type Conn = TcpConnection;

    async fn connect(&mut self, limit: Duration) -> Result<TcpConnection, PollError> {
        let addr: SocketAddr = tokio::net::lookup_host(self.address.as_str())
            .await?
            .next()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} resolves to no address", self.address),
                )
            })?;
        let stream = timeout(limit, TcpStream::connect(addr))
            .await
            .map_err(|_| PollError::Timeout(limit))??;
        let _ = stream.set_nodelay(true);
        Ok(TcpConnection(MbapClient::new(stream, self.metrics.clone())))
    }
}

/// One Modbus TCP connection.
#[derive(Debug)]
struct TcpConnection(MbapClient<TcpStream>);

impl Transact for TcpConnection {
    /// A late reply would sit in the socket: drop the connection instead. (A stale copy
    /// of an earlier reply is read past by its transaction id.)
    const DISCARDS_LATE_REPLIES: bool = false;

    async fn read(&mut self, read: Read) -> Result<Vec<u16>, PollError> {
        let Read {
            unit,
            function,
            req,
            limit,
        } = read;
        self.0.read(unit, function, req, limit).await
    }
}

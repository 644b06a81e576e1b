//! The Modbus TCP transport: connecting an endpoint and one read over tokio-modbus.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_modbus::{Request, Response};
use tracing::info;

use crate::config::DeviceConfig;
use crate::profile::FunctionCode;
use crate::source::poll::{
    Connector, HandOff, Pacing, PollError, PolledDevice, Read, Scheduler, Transact,
};
use crate::source::SourceContext;

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
                },
                devices,
                self.cx.clone(),
                Pacing::default(),
            )
        };
        let healthy = lane(self.devices).with_hand_off(to_probation);
        let probation = lane(Vec::new()).with_hand_off(to_healthy);
        tokio::join!(healthy.run(), probation.run());
        info!("modbus poller stopped");
    }
}

/// Connects to one Modbus TCP endpoint.
#[derive(Debug)]
struct TcpEndpoint {
    address: String,
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
        Ok(TcpConnection(tokio_modbus::client::tcp::attach_slave(
            stream,
            Slave(1),
        )))
    }
}

/// A tokio-modbus client context on one TCP connection.
struct TcpConnection(Context);

impl std::fmt::Debug for TcpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TcpConnection")
    }
}

impl Transact for TcpConnection {
    /// A late reply would sit in the socket: drop the connection instead.
    const DISCARDS_LATE_REPLIES: bool = false;

    async fn read(&mut self, read: Read) -> Result<Vec<u16>, PollError> {
        let Read {
            unit,
            function,
            req,
            limit,
        } = read;
        self.0.set_slave(Slave(unit.0));
        let request = match function {
            FunctionCode::ReadHolding => Request::ReadHoldingRegisters(req.start.0, req.count),
            FunctionCode::ReadInput => Request::ReadInputRegisters(req.start.0, req.count),
        };
        let reply = timeout(limit, self.0.call(request))
            .await
            .map_err(|_| PollError::Timeout(limit))?;
        let response = match reply {
            Ok(Ok(r)) => r,
            Ok(Err(code)) => return Err(PollError::Exception(u8::from(code).into())),
            Err(tokio_modbus::Error::Transport(e)) => return Err(PollError::Transport(e)),
            Err(tokio_modbus::Error::Protocol(e)) => {
                return Err(PollError::BadFrame(e.to_string()))
            }
        };
        let words = match response {
            Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => w,
            other => {
                return Err(PollError::BadFrame(format!(
                    "unexpected response {other:?}"
                )))
            }
        };
        if words.len() != usize::from(req.count) {
            return Err(PollError::BadFrame(format!(
                "asked for {} registers at {}, got {}",
                req.count,
                req.start,
                words.len()
            )));
        }
        Ok(words)
    }
}

//! Modbus TCP polling: one [`ModbusPoller`] task per endpoint.
//!
//! Many unit ids may sit behind one endpoint (serial servers, DTUs), so the poller owns
//! the endpoint's single connection and runs one transaction at a time. Every request
//! has a timeout (tokio-modbus has none); after a timeout or a protocol error the
//! connection is dropped, so a late reply can never be taken for the next answer. A
//! device whose request times out moves to a probation lane with a connection of its
//! own and is retried with exponential backoff (capped by `modbus.backoff_max`); it
//! returns after its first good poll. A dead meter thus costs the others only the one
//! timeout that revealed it. Device exceptions, timeouts and transport errors are
//! distinct [`ModbusError`]s and distinct counters; an exception does not break the
//! connection (the device is alive). A read the device rejects as an illegal data
//! address is reported once and not sent again for [`ILLEGAL_ADDRESS_RETRY`] (its fields
//! are missing meanwhile), so a profile that does not fit a firmware is not hammered.

pub mod plan;
mod poller;

pub use plan::{plan, ReadRequest};
pub use poller::{ModbusPoller, PolledDevice};

use std::time::Duration;

/// How often a read the device rejected as an illegal data address is tried again
/// (Modbus TCP and RTU alike).
pub const ILLEGAL_ADDRESS_RETRY: Duration = Duration::from_secs(600);

/// How a Modbus transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum ModbusError {
    /// The device answered with a Modbus exception: it is alive; do not reconnect.
    #[error("device exception: {0}")]
    Exception(tokio_modbus::ExceptionCode),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection failed or broke.
    #[error("transport: {0}")]
    Transport(#[from] std::io::Error),
    /// A reply that does not fit the request (wrong header, function or length).
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ModbusError {
    /// Whether the connection must be dropped before the next transaction.
    pub fn breaks_connection(&self) -> bool {
        !matches!(self, ModbusError::Exception(_))
    }
}

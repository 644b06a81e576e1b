//! The one polling core for every Modbus transport (TCP, RTU; the next meter protocol).
//!
//! A transport supplies two things: a [`Connector`] that opens a connection (TCP
//! connect, serial open, waiting for a DTU to dial in) and a connection that implements
//! [`Transact`] (one read at a time, with a timeout). Everything else is here, once:
//! the [`Scheduler`] polls its devices in order of their due time, keeps the cadence,
//! backs a failing device off exponentially from its poll interval, gates reads the
//! device rejects as an illegal data address (reported once, retried every
//! [`ILLEGAL_ADDRESS_RETRY`]), retries a busy device up to [`BUSY_RETRIES`] times,
//! hands samples on through the [`SourceContext`](super::SourceContext), records every
//! poll in the metrics, and reconnects with the crate's [`Backoff`](crate::backoff::Backoff).
//! Every wait (connect, sleep, transaction) races the cancellation token.
//!
//! Failures are one [`PollError`] with the exception as a typed [`ExceptionCode`] and a
//! classification for policy: an exception means the device is alive (no backoff, the
//! connection stays); a timeout or a reply that does not fit means the device backs
//! off; a transport error ends the connection. Whether a timeout or bad reply also ends
//! the connection is the transport's property ([`Transact::DISCARDS_LATE_REPLIES`]).

mod scheduler;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::time::Duration;

pub(crate) use scheduler::{HandOff, Pacing, PolledDevice, Scheduler};

use crate::profile::FunctionCode;
use crate::reading::UnitId;
use crate::source::modbus::ReadRequest;

/// How often a read the device rejected as an illegal data address is tried again.
pub(crate) const ILLEGAL_ADDRESS_RETRY: Duration = Duration::from_secs(600);
/// Quick retries of a poll answered "busy" before waiting for the next slot.
pub(crate) const BUSY_RETRIES: u32 = 3;
/// Delay before retrying a busy device (at most a quarter of its poll interval).
pub(crate) const BUSY_DELAY: Duration = Duration::from_millis(200);

/// A Modbus exception code from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExceptionCode {
    IllegalFunction,
    IllegalDataAddress,
    IllegalDataValue,
    ServerDeviceFailure,
    /// `0x05`: the request was accepted but takes long; ask again shortly.
    Acknowledge,
    /// `0x06`: the device is busy; ask again shortly.
    ServerBusy,
    Other(u8),
}

impl ExceptionCode {
    /// Whether the device asks to be asked again shortly (acknowledge, busy).
    pub(crate) fn is_busy(self) -> bool {
        matches!(self, ExceptionCode::Acknowledge | ExceptionCode::ServerBusy)
    }
}

impl From<u8> for ExceptionCode {
    fn from(code: u8) -> Self {
        match code {
            1 => ExceptionCode::IllegalFunction,
            2 => ExceptionCode::IllegalDataAddress,
            3 => ExceptionCode::IllegalDataValue,
            4 => ExceptionCode::ServerDeviceFailure,
            5 => ExceptionCode::Acknowledge,
            6 => ExceptionCode::ServerBusy,
            other => ExceptionCode::Other(other),
        }
    }
}

impl From<ExceptionCode> for u8 {
    fn from(code: ExceptionCode) -> u8 {
        match code {
            ExceptionCode::IllegalFunction => 1,
            ExceptionCode::IllegalDataAddress => 2,
            ExceptionCode::IllegalDataValue => 3,
            ExceptionCode::ServerDeviceFailure => 4,
            ExceptionCode::Acknowledge => 5,
            ExceptionCode::ServerBusy => 6,
            ExceptionCode::Other(c) => c,
        }
    }
}

impl std::fmt::Display for ExceptionCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-modbus's wording, so TCP and RTU devices report alike.
        let name = match self {
            ExceptionCode::IllegalFunction => "Illegal function",
            ExceptionCode::IllegalDataAddress => "Illegal data address",
            ExceptionCode::IllegalDataValue => "Illegal data value",
            ExceptionCode::ServerDeviceFailure => "Server device failure",
            ExceptionCode::Acknowledge => "Acknowledge",
            ExceptionCode::ServerBusy => "Server device busy",
            ExceptionCode::Other(_) => "Exception",
        };
        write!(f, "{name} (0x{:02X})", u8::from(*self))
    }
}

/// How one transaction (or connecting) failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PollError {
    /// The device answered with a Modbus exception: it is alive.
    #[error("device exception: {0}")]
    Exception(ExceptionCode),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Something arrived that is not the answer (wrong header, function, length, CRC).
    #[error("bad reply: {0}")]
    BadFrame(String),
    /// The connection failed or broke (or the line never fell silent).
    #[error("transport: {0}")]
    Transport(#[from] std::io::Error),
}

/// What a failure means for the schedule and the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// The device answered with an exception: no backoff, the connection stays.
    Exception(ExceptionCode),
    /// No answer: the device backs off.
    Timeout,
    /// An answer that does not fit: the device backs off.
    BadFrame,
    /// The connection is gone: it is reopened with reconnect backoff.
    Transport,
}

impl PollError {
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            PollError::Exception(code) => ErrorClass::Exception(*code),
            PollError::Timeout(_) => ErrorClass::Timeout,
            PollError::BadFrame(_) => ErrorClass::BadFrame,
            PollError::Transport(_) => ErrorClass::Transport,
        }
    }

    /// Whether the connection must be dropped before the next transaction on a
    /// transport that does (`discards_late_replies`) or does not discard late replies.
    pub(crate) fn breaks_connection(&self, discards_late_replies: bool) -> bool {
        match self.class() {
            ErrorClass::Exception(_) => false,
            ErrorClass::Timeout | ErrorClass::BadFrame => !discards_late_replies,
            ErrorClass::Transport => true,
        }
    }
}

/// One register read: from which unit, with which function, which registers, and how
/// long to wait for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Read {
    pub unit: UnitId,
    pub function: FunctionCode,
    pub req: ReadRequest,
    pub limit: Duration,
}

/// One Modbus read at a time over an open connection.
pub(crate) trait Transact: Send {
    /// Whether the connection throws away a reply that arrives after its timeout (RTU
    /// drains the line). If not, a timeout or bad reply drops the connection, so a late
    /// reply can never be taken for the next answer.
    const DISCARDS_LATE_REPLIES: bool;

    /// Sends `read` and returns the registers; the reply is checked against the request.
    fn read(&mut self, read: Read) -> impl Future<Output = Result<Vec<u16>, PollError>> + Send;

    /// Completes when the idle connection closes or fails (awaited between polls and
    /// dropped when the next poll is due); pending forever if the transport cannot
    /// tell without a transaction.
    fn closed(&mut self) -> impl Future<Output = PollError> + Send {
        std::future::pending()
    }
}

/// Opens connections to one endpoint or bus.
pub(crate) trait Connector: Send {
    type Conn: Transact;

    /// Opens a connection (or, for a DTU, waits for one); `limit` bounds a connect.
    fn connect(
        &mut self,
        limit: Duration,
    ) -> impl Future<Output = Result<Self::Conn, PollError>> + Send;

    /// A connection that replaces the open one before the next poll (a DTU that dialled
    /// in again). Checked before every poll.
    fn replacement(&mut self) -> Option<Self::Conn> {
        None
    }

    /// Called when a connection opens, after every poll, and before the connection is
    /// dropped (`up` false): for link counters and status.
    fn observe(&mut self, _conn: &mut Self::Conn, _up: bool) {}
}

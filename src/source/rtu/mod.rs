//! Modbus RTU: serial buses, RTU over TCP (serial servers, DTUs in transparent mode)
//! and DTUs that dial in to the gateway.
//!
//! - `frame`: CRC, request encoding, reply scanning (hand-written, see there why).
//! - `timing`: character and silence times, the bus budget (cycle time, load).
//! - `link`: one transaction at a time over any byte stream, with draining.
//! - `bus`: the [`RtuBus`] task that owns one bus and schedules its devices.
//! - `transport`: opening serial ports and TCP streams.
//! - `dtu`: the [`DtuListener`](dtu::DtuListener) for DTUs that dial in, and who
//!   may take a registered DTU's place.

pub mod bus;
pub mod dtu;
pub(crate) mod frame;
pub(crate) mod link;
pub(crate) mod spawn;
pub(crate) mod timing;
pub mod transport;

pub use crate::profile::line::{LineOverride, DEFAULT_LINE};
pub use bus::RtuBus;
pub(crate) use link::{RtuError, Transactor};
pub use timing::{BusBudget, LineTiming};

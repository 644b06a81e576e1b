//! Modbus TCP: one [`ModbusPoller`] per endpoint, a thin transport under the shared
//! polling core (`source::poll`).
//!
//! Many unit ids may sit behind one endpoint (serial servers, DTUs), so the poller owns
//! the endpoint's connections and runs one transaction at a time on each (`mbap`: the
//! framing, which reads past a stale reply carrying an earlier transaction id). Every
//! request has a timeout; after a timeout or a protocol error the
//! connection is dropped, so a late reply can never be taken for the next answer. A
//! device whose request times out moves to a probation lane with a connection of its
//! own and is retried with exponential backoff (capped by `modbus.backoff_max`); it
//! returns after its first good poll. A dead meter thus costs the others only the one
//! timeout that revealed it. Exceptions, illegal-address gating, busy retries and
//! backoff are the polling core's and the same as on RTU.

mod mbap;
pub mod plan;
mod poller;

pub use plan::{plan, ReadRequest};
pub(crate) use poller::ModbusPoller;

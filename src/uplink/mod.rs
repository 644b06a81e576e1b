//! The gateway's uplink: committed batches from the store to the hub over MQTT, deleted only
//! on the hub's end-to-end ack ([`Forwarder`]). The MQTT transport it runs on is `mqtt`; the
//! topics and the ack format are `wire`'s.

mod forwarder;
mod lanes;
pub(crate) mod presence;

pub(crate) use forwarder::{Forwarder, ForwarderOptions};

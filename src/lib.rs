//! citygate: an edge gateway for city-brain meter data.
//!
//! The modules follow the pipeline: `config` and `profile` describe what to poll,
//! `source` polls meters, `transform` normalises, checks and minimises readings,
//! `seal` turns records into encrypted, signed batches, `store` keeps them durable
//! until the hub acknowledges them, `uplink` forwards them to the hub; `hub` is the
//! receiving end (verify, decrypt, de-duplicate, write, ack). `mqtt` is the MQTT/TLS
//! transport every MQTT speaker shares (with an embedded broker for one-box setups), and
//! `wire` the topics and acks gateways and hubs exchange. `supervisor` wires the tasks; `status` and
//! `telemetry` report on them; `sim` serves simulated meters for tests, demos and
//! commissioning practice.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod diag;
pub mod emergency;
pub mod hub;
pub mod mqtt;
pub mod pipeline;
pub mod policy;
pub mod profile;
pub mod reading;
pub mod seal;
pub mod sim;
pub mod source;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod telemetry;
#[cfg(test)]
mod test_fixtures;
pub mod transform;
pub mod uplink;
pub mod wire;
